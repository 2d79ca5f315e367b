"""``mini-flow``: an SD3-layout rectified-flow miniature model, trained in the miniature world.

SD3's component classes and conditioning, sized for 64 x 64 scenes:

- two CLIP text encoders with projections over the miniature tokenizer (3 layers, 32 wide each). As in SD3, the
  token embeddings are both encoders' penultimate hidden states side by side (32 + 32 = 64 wide, SD3's 768 + 1280,
  which SD3 pads to T5's 4096), followed by the 256 zero rows that stand for T5 when a pipeline has none (as
  diffusers builds them); the pooled embedding is both projected end-of-text states side by side (64 wide, SD3's
  2048);
- an ``SD3Transformer2DModel`` (MMDiT joint attention) over 2 x 2 patches of the 16 x 16 latents;
- the miniature model's VAE and tokenizer, shared (not stored twice), and a ``FlowMatchEulerDiscreteScheduler``
  with shift 1 (SD3 uses 3 at 1024 px; its shift grows with the resolution, and these scenes are 64 px).

**Training** regresses the velocity ``v = noise - x0`` at ``x_s = (1 - s) x0 + s noise``, SD3's objective. The
target is the miniature model's own conditional expectation where its noise levels reach (the recipe that gave
``mini-v`` its round trip): a flow latent is a rescaled DDPM latent, ``sqrt(abar) x_s / (1 - s)`` with
``abar = (1 - s)^2 / ((1 - s)^2 + s^2)``, so the miniature model's noise estimate there gives ``E[noise | x_s]``,
``x0 = (x_s - s eps) / (1 - s)`` and ``v = eps - x0``. Beyond its noisiest level (``s`` above about 0.94) the
example's own ``noise - x0`` is the target. Timesteps: half the batch SD3's logit-normal, half uniform (sampling
and inversion walk the whole schedule, the ends included). Captions are dropped 10% of the time to the empty
prompt, which is what SD3's pipeline feeds the unconditional branch, for student and teacher alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from .config import VariantConfig
from .train import Log
from .variants import caption_ids, fit, log_done, save_trained, trainable, training_run, world_latents
from .xl import build_text_encoder

SIZE = 64
SHIFT = 1.0
NETWORKS = ("transformer", "text_encoder", "text_encoder_2")  # what training moves and saving keeps (in fp16)


def flow_config(steps: int = 2500, lr: float = 5e-4, ema_decay: float = 0.995, weight_decay: float = 0.01,
                warmup: int = 100, batch: int = 16) -> VariantConfig:
    """The recipe of ``mini-flow``: mini-xl's schedule with a transformer's smaller learning rate, at batch 16
    (each example attends over 333 text rows, 256 of them T5's zeros, and 64 image patches: a step at batch 32
    cost 4.5 s of one busy thread with six 128-wide layers; these four 96-wide ones at batch 16 fit 60 minutes)."""
    return VariantConfig(steps=steps, lr=lr, ema_decay=ema_decay, weight_decay=weight_decay, warmup=warmup,
                         batch=batch)


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=96, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def build_untrained_pipeline(base, seed: int = 0) -> StableDiffusion3Pipeline:
    """``mini-flow``'s architecture with fresh weights, on ``base``'s (the miniature model's) VAE and tokenizer."""
    tokenizer = base.tokenizer
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_transformer()
        text_encoder = build_text_encoder(CLIPTextModelWithProjection, *ids)
        text_encoder_2 = build_text_encoder(CLIPTextModelWithProjection, *ids)
    return assemble(transformer, text_encoder, text_encoder_2, base, flow_scheduler())


def assemble(transformer, text_encoder, text_encoder_2, base, scheduler) -> StableDiffusion3Pipeline:
    """The SD3 pipeline of these networks on ``base``'s VAE (its shift factor set to 0: the miniature VAE's
    latents are not shifted, and SD3's pipeline adds the config's shift when decoding) and tokenizer."""
    vae = base.vae
    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=base.tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=base.tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


T5_ROWS = 256  # the zero rows SD3's pipeline appends for T5 when it has none (its max_sequence_length)


def conditioning(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (B, 77 + 256, 64) and pooled embedding (B, 64) of token ids, as SD3's ``encode_prompt``
    makes them without T5 (checked against it in the tests)."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    t5 = clip.new_zeros(clip.shape[0], T5_ROWS, clip.shape[-1])
    return torch.cat([clip, t5], dim=1), torch.cat([first.text_embeds, second.text_embeds], dim=-1)


def teacher_levels(scheduler, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flow times ``s``: the DDPM ``abar`` with the same signal-to-noise ratio, the (fractional) timestep of
    the teacher's schedule at that ``abar``, and whether the teacher's schedule reaches it."""
    abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
    table = scheduler.alphas_cumprod.double()
    log_table = table.log().flip(0).numpy()  # increasing
    steps = np.arange(len(table))[::-1].astype(np.float64)
    t = np.interp(abar.double().log().numpy(), log_table, steps)
    reached = abar >= table[-1].float()
    return abar, torch.from_numpy(t).float(), reached


def teacher_velocity(teacher, scheduler, x_s: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The velocity ``E[noise - x0 | x_s]`` the epsilon teacher implies at flow latents ``x_s`` (see the module)."""
    abar, t, _ = teacher_levels(scheduler, s)
    shape = (-1, 1, 1, 1)
    scale = (abar.sqrt() / (1 - s)).view(shape)
    eps = teacher(x_s * scale, t, encoder_hidden_states=cond).sample
    x0 = (x_s - s.view(shape) * eps) / (1 - s).view(shape)
    return eps - x0


def train_flow(out: Path, config: VariantConfig, *, progress: bool = True, log: Log | None = None) -> Path:
    """Train ``mini-flow`` into ``out/model`` (checkpoints under ``out/work``) on the miniature VAE's latents."""
    from ..models.loading import load_pipeline

    with training_run(out, config, log) as (log, watch):
        base = load_pipeline("mini", device="cpu", dtype="fp32")
        work = out / "work"
        work.mkdir(parents=True, exist_ok=True)
        with watch("dataset"):
            latents, captions = world_latents(base.vae, config.dataset_size, config.seed, work, progress)
        teacher = load_pipeline("mini", device="cpu", dtype="fp32")
        pipe = build_untrained_pipeline(base, config.seed)
        with watch("train"):
            _train(pipe, teacher, latents, captions, config, work, log, progress)
        folder = out / "model"
        save_trained(pipe, folder, NETWORKS)
        log_done(log, watch, f"model saved to {folder}")
        return folder


def _train(pipe, teacher, latents, captions, config: VariantConfig, work: Path, log: Log, progress: bool) -> None:
    modules = trainable(pipe, NETWORKS)
    teacher.unet.requires_grad_(False)
    teacher.text_encoder.requires_grad_(False)
    ids = caption_ids(pipe.tokenizer, captions)
    empty = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    num_train = pipe.scheduler.config.num_train_timesteps

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (config.batch,), generator=generator)
        x0 = latents[index]
        tokens = ids[index].clone()
        tokens[torch.rand(config.batch, generator=generator) < config.caption_dropout] = empty
        half = config.batch // 2
        s = torch.cat([torch.sigmoid(torch.randn(half, generator=generator)),
                       torch.rand(config.batch - half, generator=generator)]).clamp(1e-4, 1 - 1e-4)
        noise = torch.randn(x0.shape, generator=generator)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        target = noise - x0
        with torch.no_grad():
            reached = teacher_levels(teacher.scheduler, s)[2]
            if reached.any():
                cond = teacher.text_encoder(tokens[reached])[0]
                target[reached] = teacher_velocity(teacher.unet, teacher.scheduler, x_s[reached], s[reached], cond)
        token_states, pooled = conditioning(pipe, tokens)
        prediction = pipe.transformer(hidden_states=x_s, timestep=s * num_train, encoder_hidden_states=token_states,
                                      pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(prediction, target)

    fit(modules, loss_of_batch, config, work / "flow.pt", log, progress, "mini-flow")
    modules.eval().requires_grad_(False)
