"""Imagic (Kawar et al., CVPR 2023) on Stable Diffusion: the baseline of method.md section 2.

Per seed:

1. Stage A, text optimization, shared with the paper's method (:func:`nonrigid.stages.cached.text_stages`, same
   cache entries): ``e_opt`` such that the frozen UNet denoises the image well.
2. Fine-tune a *copy* of the UNet on the image with ``e_opt`` fixed: ``|| eps_theta'(x_t, t, e_opt) - noise ||^2``
   with Adam (:func:`finetune_unet`).
3. Sample from random noise with the copy, conditioned on ``alpha * e_tgt + (1 - alpha) * e_opt`` for every alpha of
   the sweep, classifier-free guidance against ``tau("")``, DDIM (:func:`imagic_sample`).

The fine-tuned weights belong to one edit of one seed: they are trained on a deep copy and dropped afterwards;
the model's denoiser is never trained, so later edits (of any method) see the original weights. Nothing of the
fine-tuning is cached (a UNet per edit is far too large); stage A is.

Memory plan for SD 1.x at fp16 on a 16 GB GPU. The copy is trained in fp32 (an update of lr 2e-6 is below fp16's
resolution for most weights, so half-precision training would mostly round it away): weights 3.4 GB + gradients
3.4 GB + Adam's two moments 6.9 GB = 13.8 GB. To make room, the frozen fp16 UNet (1.7 GB) is moved to the CPU while
the copy trains and moved back afterwards — ``Module.to`` moves parameters in place and a device round trip copies
bits, so the restored UNet is the same object with bit-identical weights, dtype, device and ``requires_grad``. On
CUDA the copy uses gradient checkpointing (activations are recomputed instead of stored) and fused Adam (no
parameter-sized temporaries in the update). The copy also *samples* in fp32, for the same reason it trains in fp32.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from ..stages.cached import TextRequest, TextSettings, text_stages
from ..stages.sampling import interpolate
from ..stages.text_optimization import TextOptimization
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import IMAGIC as INFO

__all__ = [
    "INFO",
    "ImagicSeedResult",
    "finetune_unet",
    "imagic_latents",
    "imagic_sample",
    "run",
    "seed_generator",
    "stage_a_latent_generator",
]


@dataclass
class ImagicSeedResult:
    """Steps 2 and 3 for one seed: the final latents (one row per alpha), the fine-tuning loss curve, timings."""

    seed: int
    alphas: tuple[float, ...]
    latents: torch.Tensor
    finetune_losses: list[float]
    timings: dict[str, float] = field(default_factory=dict)


def seed_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one purpose (``"finetune"``, ``"noise"``) of one seed.

    Separate streams keep the purposes independent: the initial noise x_T does not depend on how many fine-tuning
    steps drew from their stream, so a sweep over fine-tuning lengths compares like with like, and neither stream
    repeats stage A's draws (which come from ``torch.Generator().manual_seed(seed)``). CPU, so results do not
    depend on the device.
    """
    digest = hashlib.sha256(f"nonrigid/imagic/{stream}/{int(seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def stage_a_latent_generator(seed: int) -> torch.Generator:
    """The generator whose first draw is the VAE posterior sample that stage A optimised ``e_opt`` for.

    :func:`nonrigid.stages.text_optimization.optimize_texts` draws each row's latent sample first from
    ``torch.Generator().manual_seed(seed)``; drawing again from a fresh one reproduces that very sample.
    """
    return torch.Generator().manual_seed(int(seed))


@contextmanager
def unet_parked(model: ModelFamily, park_device: str | torch.device | None) -> Iterator[None]:
    """Move the model's denoiser to ``park_device`` for the duration of the block, then back to where it was.

    Only the device changes (``Module.to(device)`` keeps each parameter's dtype and Parameter object, so
    ``requires_grad`` and identity survive), and the way back runs even when the block raises.
    """
    unet = model.network  # the UNet, or a flow model's transformer
    home = unet.device
    if park_device is None or torch.device(park_device) == home:
        yield
        return
    unet.to(park_device)
    try:
        yield
    finally:
        unet.to(home)


def default_park_device(model: ModelFamily) -> str | None:
    """Park the frozen UNet on the CPU during fine-tuning on CUDA; not when accelerate's offload hooks manage it."""
    unet = model.network
    if unet.device.type != "cuda" or hasattr(unet, "_hf_hook"):
        return None
    return "cpu"


def finetune_unet(
    model: ModelFamily,
    picture: Image.Image,
    embedding: Conditioning | torch.Tensor,
    steps: int,
    lr: float,
    generator: torch.Generator,
    *,
    latent_generator: torch.Generator | None = None,
    park_device: str | torch.device | None = "auto",
    progress: Progress = False,
) -> tuple[torch.nn.Module, list[float]]:
    """Fine-tune an fp32 copy of the model's denoiser to denoise ``picture`` under the fixed ``embedding`` (Imagic step
    2).

    Each of ``steps`` Adam steps (lr ``lr``) draws ``t ~ U{0..T-1}`` and ``noise ~ N(0, I)`` from ``generator`` and
    minimises the model's own training loss (``mean((eps_copy(x_t, t, embedding) - noise)^2)`` for epsilon models, v as
    target for v models) with ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    ``x0`` is a *sample* of the VAE posterior, not its mean, drawn first from ``latent_generator`` (default:
    ``generator``): :func:`run` passes :func:`stage_a_latent_generator`, so the UNet is fine-tuned on the very latent
    sample that ``e_opt`` was optimised for — the reference draws one sample and uses it for both stages.

    Returns the copy (frozen again, eval mode, no gradients, on the pipeline's device, fp32) and the loss of every step.
    The model's own denoiser is untouched; with ``park_device`` (``"auto"``: the CPU when on CUDA) it waits there while
    the copy trains and is restored exactly afterwards.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = model.device
    if park_device == "auto":
        park_device = default_park_device(model)
    x0 = model.encode_image(picture, generator=generator if latent_generator is None else latent_generator)
    condition = Conditioning.of(embedding).detach().to(device=device, dtype=torch.float32)
    with unet_parked(model, park_device), torch.enable_grad():
        # Copied where the original waits (the CPU on CUDA), so the GPU never holds both UNets at once.
        # (.float(): an explicit dtype in ModelMixin.to earns a spurious "keep in float32" warning)
        trainee = copy.deepcopy(model.network).to(device).float()
        trainee.requires_grad_(True)
        if device.type == "cuda":
            trainee.enable_gradient_checkpointing()
        losses = _train(model.with_denoiser(trainee), x0, condition, steps, lr, generator, progress)
    if device.type == "cuda":
        trainee.disable_gradient_checkpointing()
    for parameter in trainee.parameters():
        parameter.grad = None
    trainee.requires_grad_(False).eval()
    return trainee, losses


def _train(
    tuned: ModelFamily,
    x0: torch.Tensor,
    condition: torch.Tensor,
    steps: int,
    lr: float,
    generator: torch.Generator,
    progress: Progress,
) -> list[float]:
    """The fine-tuning loop of ``tuned.denoiser`` under the model's own training loss; the optimizer (and its
    2x-the-weights state) is freed when it returns."""
    device = x0.device
    optimizer = torch.optim.Adam(tuned.denoiser.parameters(), lr=lr, fused=device.type == "cuda")
    losses: list[float] = []
    for _ in track(range(steps), "Imagic fine-tuning", progress):
        timestep = tuned.draw_training_timestep(generator)
        noise = torch.randn(x0.shape, generator=generator)
        timestep, noise = timestep.to(device), noise.to(device)
        noisy, wanted = tuned.training_example(x0, noise, timestep)
        loss = ((tuned.predict(noisy, timestep, condition) - wanted) ** 2).mean()
        check_finite(loss.detach(), "Imagic fine-tuning")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def imagic_sample(
    model: ModelFamily,
    unet: torch.nn.Module,
    text_optimization: TextOptimization,
    alphas: Sequence[float],
    guidance_scale: float,
    num_steps: int,
    generator: torch.Generator,
    *,
    size: tuple[int, int] | None = None,
    batch_size: int | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """DDIM sampling from random noise with ``alpha * e_tgt + (1 - alpha) * e_opt`` for every alpha (Imagic step 3).

    One x_T (drawn from ``generator`` on the CPU) is shared by every alpha, so alpha is the only difference between
    rows, and all alphas run as one batch (in chunks of ``batch_size`` rows when given). Classifier-free guidance
    against ``tau("")`` at ``guidance_scale``. ``size`` is (width, height) in pixels (default: the UNet's native
    size). Returns the final latents (len(alphas), 4, h, w), fp32.
    """
    width, height = size or (model.defaults.size,) * 2
    device = unet.device
    x_T = torch.randn(model.latent_shape(width, height), generator=generator).to(device)
    tuned = model.with_denoiser(unet)
    conds = Conditioning.cat([interpolate(text_optimization, float(a)) for a in alphas]).to(device)
    uncond = model.unconditional()  # None on FLUX: no unconditional branch
    uncond = None if uncond is None else uncond.to(device)
    scheduler = model.sampling_scheduler(num_steps, x_T)
    latents = (x_T * scheduler.init_noise_sigma).repeat(len(alphas), 1, 1, 1)
    rows = torch.arange(len(alphas))
    for t in track(scheduler.timesteps, "Imagic sampling", progress):
        for part in rows.split(batch_size or len(alphas)):
            eps = tuned.predict(latents[part], t, conds.rows(part), uncond, guidance_scale)
            latents[part] = scheduler.step(eps, t, latents[part]).prev_sample
    check_finite(latents, "Imagic sampling")
    return latents


def imagic_latents(
    model: ModelFamily,
    picture: Image.Image,
    text_optimization: TextOptimization,
    alphas: Sequence[float],
    *,
    finetune_steps: int,
    finetune_lr: float,
    guidance_scale: float,
    num_steps: int,
    batch_size: int | None = None,
    park_device: str | torch.device | None = "auto",
    progress: Progress = False,
) -> ImagicSeedResult:
    """Steps 2 and 3 for the seed of ``text_optimization``: fine-tune a copy, sample every alpha, drop the copy."""
    seed = text_optimization.seed
    watch = Stopwatch()
    with watch("finetuning"):
        unet, losses = finetune_unet(
            model, picture, text_optimization.optimized, finetune_steps, finetune_lr,
            seed_generator(seed, "finetune"), latent_generator=stage_a_latent_generator(seed),
            park_device=park_device, progress=progress,
        )
    try:
        with watch("sampling"):
            latents = imagic_sample(
                model, unet, text_optimization, alphas, guidance_scale, num_steps, seed_generator(seed, "noise"),
                size=picture.size, batch_size=batch_size, progress=progress,
            )
    finally:
        del unet  # the fine-tuned weights belong to this edit only
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return ImagicSeedResult(seed, tuple(float(a) for a in alphas), latents, losses, watch.seconds)


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: stage A for every seed (cached), then per seed: fine-tune a copy, sample every alpha; variants
    seed, then alpha."""
    return [_edit(model, edit, ctx) for edit in edits]


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    p = ctx.params
    watch = Stopwatch()
    with watch("text_optimization"):
        ((texts, reused),) = text_stages(model, [TextRequest(edit.image, edit.target_prompt, ctx.seeds,
                                                             edit.cache_fields)],
                                         TextSettings(p["opt_steps"], p["opt_lr"]), ctx.cache, ctx.progress)
    variants: list[Variant] = []
    finetune_losses: dict[int, list[float]] = {}
    for text in texts:
        result = imagic_latents(
            model, edit.image, text, p["alphas"], finetune_steps=p["finetune_steps"], finetune_lr=p["finetune_lr"],
            guidance_scale=p["guidance_scale"], num_steps=p["num_steps"], batch_size=ctx.batch_size,
            progress=ctx.progress,
        )
        for stage, seconds in result.timings.items():
            watch.seconds[stage] = watch.seconds.get(stage, 0.0) + seconds
        with watch("decoding"):
            images = model.decode(result.latents)
        variants.extend(Variant(text.seed, {"alpha": a}, img) for a, img in zip(result.alphas, images, strict=True))
        finetune_losses[text.seed] = result.finetune_losses
    record = {
        "finetune_losses": finetune_losses,
        "text_optimization_final_loss": {t.seed: (t.losses[-1] if t.losses else None) for t in texts},
        "finetune_dtype": "float32",
    }
    return ctx.result(edit, variants, watch.seconds, cache={"text_optimization": reused}, record=record)
