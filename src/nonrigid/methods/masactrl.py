"""MasaCtrl (Cao et al., ICCV 2023): mutual self-attention control, run on a null-text inversion as in the paper.

Source and target are sampled together from the same inverted latent x_T. The source branch is conditioned on the
source prompt with NTI's null embeddings, so it retraces the NTI reconstruction of the input. From sampling step
``start_step`` on, in the UNet's self-attention layers from index ``start_layer`` on (forward order: down, mid,
up; 16 layers in SD 1.x), each target branch's queries attend to the keys and values of the source branch instead
of its own: the target keeps the source's content (textures, identity) while its cross-attention to the target
prompt and its own queries let the layout change.

The control is a diffusers attention processor (:class:`MutualSelfAttentionProcessor`) installed with
``unet.set_attn_processor`` for the duration of the sampling (:func:`mutual_self_attention`) and told the current
step through a small shared state object (:class:`MutualAttentionState`). Every ``start_step`` of the sweep is one
more target branch of the same batch; all share the one source branch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..errors import UsageError, check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from ..stages.inversion import Inversion
from ..stages.masks import blend, latent_mask
from ..stages.sampling import decoded, reference_path
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import MASACTRL as INFO
from .nti import nti_inversions

__all__ = [
    "INFO",
    "MutualAttentionState",
    "MutualSelfAttentionProcessor",
    "masactrl_latents",
    "mutual_self_attention",
    "restored_attention_processors",
    "run",
    "self_attention_layers",
]

# forward order of the UNet's parts; ``unet.attn_processors`` lists them in registration order (down, up, mid)
_FORWARD_ORDER = ("down_blocks", "mid_block", "up_blocks")


@dataclass
class MutualAttentionState:
    """What the mutual self-attention processors need to know about the next UNet call; the sampling loop sets it.

    The UNet batch is made of equal blocks (one per classifier-free-guidance half: unconditional, conditional),
    each holding the branches in the same order: branch 0 is the source, branch ``1 + j`` the target whose
    mutual attention starts at sampling step ``start_steps[j]``. ``step`` is the sampling step being computed
    (0 = noisiest).
    """

    start_steps: tuple[int, ...]
    step: int = 0

    @property
    def num_branches(self) -> int:
        return 1 + len(self.start_steps)

    def key_value_rows(self, batch: int) -> list[int] | None:
        """For each row of a UNet batch, the row whose keys and values it attends to at this step.

        A target row reads the source row of its own block (uncond target -> uncond source, cond target -> cond
        source) once its start step is reached; every other row reads its own. None when no row is redirected, so
        the layer runs exactly as without control.
        """
        branches = self.num_branches
        if batch % branches:
            raise ValueError(f"UNet batch of {batch} rows is not a whole number of {branches}-branch blocks")
        if all(self.step < start for start in self.start_steps):
            return None
        rows = []
        for row in range(batch):
            block_start, branch = divmod(row, branches)
            mutual = branch > 0 and self.step >= self.start_steps[branch - 1]
            rows.append(block_start * branches if mutual else row)
        return rows


class MutualSelfAttentionProcessor:
    """A self-attention processor whose target rows attend to the source row's keys and values (MasaCtrl).

    It composes the layer's original processor (e.g. diffusers' ``AttnProcessor2_0``), which does the attention
    itself: redirected rows are given the source row's hidden states as ``encoder_hidden_states``, from which the
    original processor projects keys and values with the layer's own ``to_k``/``to_v`` — exactly the source's keys
    and values — while queries still come from each row's own hidden states. Rows that are not redirected, and every
    row before the start step, compute plain self-attention, so the source branch is never changed.
    """

    def __init__(self, original: Any, state: MutualAttentionState):
        self.original = original
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        rows = self.state.key_value_rows(hidden_states.shape[0]) if encoder_hidden_states is None else None
        if rows is not None:
            encoder_hidden_states = hidden_states[rows]
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def self_attention_layers(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of the UNet's self-attention layers (``attn1``) in forward order: down, mid, up blocks.

    This is MasaCtrl's layer index (SD 1.x: 16 layers, 6 down, 1 mid, 9 up).
    """
    names = [name for name in unet.attn_processors if name.endswith("attn1.processor")]
    part = {prefix: rank for rank, prefix in enumerate(_FORWARD_ORDER)}
    return sorted(names, key=lambda name: part.get(name.split(".")[0], len(part)))  # stable within a part


def scaled_start_layer(unet: UNet2DConditionModel) -> int:
    """MasaCtrl's layer 10 of SD 1.x's 16 (the decoder's last six), at the same relative depth on another UNet:
    10 on SD 1.x, and a layer inside the decoder on the small test models too."""
    return round(len(self_attention_layers(unet)) * 10 / 16)


def check_start_layer(unet: UNet2DConditionModel, start_layer: int) -> int:
    """Refuse a ``start_layer`` past the model's last self-attention layer; return how many layers there are."""
    count = len(self_attention_layers(unet))
    if not 0 <= start_layer < count:
        raise UsageError(
            f"start_layer={start_layer} is past this model's last self-attention layer (it has {count}: "
            f"0..{count - 1}; SD 1.x has 16 and MasaCtrl uses 10); set start_layer to at most {count - 1}"
        )
    return count


def _check_plain_self_attention(unet: UNet2DConditionModel, names: Sequence[str]) -> None:
    """The processor passes source hidden states as ``encoder_hidden_states``; that equals the source's own keys
    and values only when the layer applies no norm between its input and the key/value projections."""
    for name in names:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_cross is not None:
            raise UsageError(f"MasaCtrl supports SD-style self-attention layers only; {name} normalises its input")


@contextmanager
def restored_attention_processors(unet: UNet2DConditionModel) -> Iterator[dict[str, Any]]:
    """Put the UNet's very processor objects back on exit (also after an error), whatever happened inside."""
    originals = dict(unet.attn_processors)
    try:
        yield originals
    finally:
        unet.set_attn_processor(dict(originals))  # set_attn_processor empties the dict it is given


@contextmanager
def mutual_self_attention(
    unet: UNet2DConditionModel, state: MutualAttentionState, start_layer: int
) -> Iterator[None]:
    """Install :class:`MutualSelfAttentionProcessor` on self-attention layers ``start_layer..``, restore on exit."""
    check_start_layer(unet, start_layer)
    controlled = self_attention_layers(unet)[start_layer:]
    _check_plain_self_attention(unet, controlled)
    with restored_attention_processors(unet) as originals:
        processors = dict(originals)
        for name in controlled:
            processors[name] = MutualSelfAttentionProcessor(originals[name], state)
        unet.set_attn_processor(processors)
        yield


@torch.no_grad()
def masactrl_latents(
    model: ModelFamily,
    inversion: Inversion,
    target: torch.Tensor,
    start_steps: Sequence[int],
    start_layer: int,
    *,
    batch_size: int | None = None,
    mask: torch.Tensor | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """Final latents of the source branch (row 0) and one target branch per ``start_steps`` value (rows 1..).

    Every branch starts from x_T = ``inversion.latent`` and uses the inversion's null embedding ``uncond_at(i)``
    and guidance scale; the source is conditioned on ``inversion.source_embedding``, the targets on ``target``
    (tau(target prompt), (1, 77, D)). A ``start_step`` at or past the number of steps leaves that target plain.
    ``batch_size`` bounds the branches per UNet call (the source is recomputed with each chunk of targets).
    ``mask`` (a latent-resolution weight): outside it the targets follow the inversion's reconstruction
    (:mod:`nonrigid.stages.masks`).
    """
    if not start_steps:
        raise ValueError("give at least one start step")
    per_call = len(start_steps) if batch_size is None else max(1, batch_size - 1)
    targets = []
    for first in range(0, len(start_steps), per_call):
        chunk = tuple(int(s) for s in start_steps[first : first + per_call])
        latents = _sample_branches(model, inversion, target, chunk, start_layer, mask, progress)
        source = latents[:1]  # the same in every chunk
        targets.append(latents[1:])
    return torch.cat([source, *targets])


def _sample_branches(
    model: ModelFamily,
    inversion: Inversion,
    target: torch.Tensor,
    start_steps: tuple[int, ...],
    start_layer: int,
    mask: torch.Tensor | None,
    progress: Progress,
) -> torch.Tensor:
    """One batch: the source branch and the targets ``start_steps``, sampled together under mutual attention."""
    scheduler = model.sampling_scheduler(inversion.num_steps, inversion.latent)
    state = MutualAttentionState(start_steps)
    reference = reference_path(inversion)
    conds = Conditioning.cat([inversion.source, Conditioning.of(target).expand(len(start_steps))])
    latents = inversion.latent.expand(state.num_branches, -1, -1, -1).clone()
    with mutual_self_attention(model.network, state, start_layer):
        for i, t in enumerate(track(scheduler.timesteps, "MasaCtrl sampling", progress)):
            state.step = i
            eps = model.predict(latents, t, conds, inversion.uncond_at(i), inversion.guidance_scale)
            latents = scheduler.step(eps, t, latents).prev_sample
            if mask is not None:  # the targets outside the mask: back on the reconstruction
                latents[1:] = blend(latents[1:], reference[i + 1 : i + 2], mask)
    check_finite(latents, "MasaCtrl sampling")
    return latents


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: its NTI inversion (cached, shared with ``nti`` and ``ours``), then one batch: source + a target
    per start step."""
    return [_edit(model, edit, ctx) for edit in edits]


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    p = ctx.params
    unet = model.network
    start_layer = scaled_start_layer(unet) if p["start_layer"] is None else p["start_layer"]
    layers = check_start_layer(unet, start_layer)
    watch = Stopwatch()
    with watch("inversion"):
        ((inversion, hit),) = nti_inversions(model, [edit], ctx)
    with watch("sampling"):
        start_steps = p["start_step"]
        mask = None if edit.mask is None else latent_mask(edit.mask, inversion.latent)
        latents = masactrl_latents(model, inversion, model.encode_prompt(edit.target_prompt), start_steps,
                                   start_layer, batch_size=ctx.batch_size, mask=mask, progress=ctx.progress)
        images = decoded(model, latents[1:], reference_path(inversion)[-1:], mask)
    variants = [Variant(ctx.seeds[0], {"step": step}, image) for step, image in zip(start_steps, images, strict=True)]
    record = {
        "self_attention_layers": layers,
        "start_layer_used": start_layer,
        "controlled_layers": layers - start_layer,
        "start_steps_without_control": [s for s in start_steps if s >= p["num_steps"]],
    }
    return ctx.result(edit, variants, watch.seconds, cache={"inversion": hit}, record=record)
