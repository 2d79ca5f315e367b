"""The miniature world's other denoisers: one per model-family case the SD 1.x miniature does not cover.

- ``mini-v``: the miniature model fine-tuned to predict ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (SD 2.x's
  768 px models), as a LoRA adapter over its UNet (text encoder, VAE and tokenizer are the miniature model's),
  regressed onto the miniature model's own predictions converted to v (:func:`teacher_velocity`).
  A LoRA keeps the shipped file small (a full UNet is 13 MB in fp16) and is the way fine-tunes of this size are
  shipped in the field; :func:`nonrigid.models.loading.load_pipeline` fuses it into the UNet on loading.
- ``mini-xl``: an SDXL-layout model (two text encoders, a pooled embedding, size conditioning) trained from scratch
  on the miniature VAE's latents; see :mod:`nonrigid.mini.xl`.

Both use one training loop (:func:`fit`): seeded, resumable from a checkpoint every ``checkpoint_every`` steps,
EMA weights for the result, logged step by step.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from ..timing import Stopwatch
from .config import VariantConfig
from .train import Log, _load_checkpoint, _save_checkpoint, cosine_lr, render_batch

# Every linear and convolution of the UNet that a v-objective needs to re-weight by the noise level: attention and
# feed-forward projections, the resnets' convolutions and timestep projections, the timestep embedding itself and
# the input / output convolutions.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2",
)
LORA_FILE = "pytorch_lora_weights.safetensors"


@torch.no_grad()
def world_latents(vae, count: int, seed: int, work: Path, progress: bool) -> tuple[torch.Tensor, list[str]]:
    """``count`` rendered scenes encoded by ``vae`` (posterior means times its scaling factor) and their captions,
    cached in ``work/dataset.pt``."""
    path = work / "dataset.pt"
    state = _load_checkpoint(path)
    if state is None:
        rng = random.Random(seed * 1000 + 3)
        latents, captions = [], []
        for _ in tqdm(range(0, count, 250), desc="encoding dataset", disable=not progress):
            pixels, text = render_batch(rng, 250)
            latents.append(vae.encode(pixels.to(vae.dtype)).latent_dist.mean.float())
            captions.extend(text)
        state = {"latents": torch.cat(latents)[:count], "captions": json.dumps(captions[:count])}
        _save_checkpoint(path, state)
    return state["latents"] * vae.config.scaling_factor, json.loads(state["captions"])


def snr_weights(scheduler, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon, ``/ (SNR + 1)`` for v."""
    if gamma <= 0:
        return torch.ones(t.shape)
    snr = compute_snr(scheduler, t)
    return snr.clamp(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


def fit(
    modules: torch.nn.Module,
    loss_of_batch: Callable[[torch.Generator], torch.Tensor],
    config: VariantConfig,
    checkpoint: Path,
    log: Log,
    progress: bool,
    desc: str,
) -> None:
    """AdamW with warm-up and cosine decay on the parameters of ``modules`` that require gradients, an EMA of
    them loaded at the end, and a checkpoint (weights, EMA, optimiser, RNG) every ``checkpoint_every`` steps."""
    params = {name: p for name, p in modules.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    ema = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(config.seed * 1000 + 4)
    start, state = 0, _load_checkpoint(checkpoint)
    if state is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["model"][name])
        ema, start = state["ema"], int(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["torch_rng"])
        log(f"{desc}: resuming at step {start}")
    bar = tqdm(range(start, config.steps), desc=desc, disable=not progress, initial=start, total=config.steps)
    running = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_lr(step, config.steps, config.warmup)
        loss = loss_of_batch(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for name, p in params.items():
                ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0 or step == config.steps - 1:
            log(f"{desc} step {step} loss {loss.item():.4f} avg {running:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step == config.steps - 1:
            _save_checkpoint(checkpoint, {
                "model": {n: p.detach() for n, p in params.items()}, "ema": ema,
                "optimizer": optimizer.state_dict(), "torch_rng": generator.get_state(), "step": step + 1,
            })
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ema[name])


def trainable(pipe, names: tuple[str, ...]) -> torch.nn.ModuleDict:
    """The pipeline's networks ``names`` as one module, in training mode with gradients on: what :func:`fit`
    moves (and checkpoints, by these names)."""
    modules = torch.nn.ModuleDict({name: getattr(pipe, name) for name in names})
    modules.train().requires_grad_(True)
    return modules


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """The captions as CLIP token ids (N, 77), padded and cut as the pipelines' prompt encoders do."""
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def save_trained(pipe, folder: Path, networks: tuple[str, ...]) -> None:
    """Save ``pipe`` as a diffusers folder, ``networks`` in fp16 (back in fp32 after), without the VAE and the
    tokenizers: those are the miniature model's, shared, and the loader puts them back."""
    import shutil

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    modules = [getattr(pipe, name) for name in networks]
    try:
        for module in modules:
            module.to(torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        for module in modules:
            module.to(torch.float32)
        diffusers_logging.set_verbosity(verbosity)
    for shared in ("vae", "tokenizer", "tokenizer_2"):
        if (folder / shared).exists():
            shutil.rmtree(folder / shared)


def caption_batch(tokenizer, captions: list[str], index: torch.Tensor, drop: torch.Tensor) -> list[str]:
    """The captions at ``index``, the dropped ones empty (the unconditional model classifier-free guidance needs)."""
    return ["" if dropped else captions[i] for i, dropped in zip(index.tolist(), drop.tolist(), strict=True)]


@contextmanager
def training_run(out: Path, config: VariantConfig, log: Log | None) -> Iterator[tuple[Log, Stopwatch]]:
    """What every variant's training run does around its work: torch's threads fixed to ``config.threads`` (for
    reproducibility; restored after), the run's log with its config first, and a stopwatch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        log = log or Log(out / "train_log.txt")
        log(f"config {json.dumps(asdict(config))}")
        yield log, Stopwatch()
    finally:
        torch.set_num_threads(threads)


def log_done(log: Log, watch: Stopwatch, saved: str) -> None:
    """The run's last line, which the family's MINIATURE.md section reads (summed over resumed runs)."""
    log(f"done in {watch.total() / 60:.1f} min (training {watch.seconds['train'] / 60:.1f} min); {saved}")


# --------------------------------------------------------------------------------------------------- mini-v


def train_v(out: Path, config: VariantConfig, *, progress: bool = True, log: Log | None = None) -> Path:
    """Fine-tune the miniature model into a v-prediction model (a LoRA over its UNet) and save the adapter and the
    v-prediction scheduler config to ``out/model``."""
    from ..models.loading import load_pipeline

    with training_run(out, config, log) as (log, watch):
        pipe = load_pipeline("mini", device="cpu", dtype="fp32")
        with watch("dataset"):
            latents, captions = world_latents(pipe.vae, config.dataset_size, config.seed, _work(out), progress)
        with watch("train"):
            _fine_tune_v(pipe, latents, captions, config, out, log, progress)
        folder = out / "model"
        save_v_adapter(pipe, folder)
        log_done(log, watch, f"adapter saved to {folder}")
        return folder


def _work(out: Path) -> Path:
    (out / "work").mkdir(parents=True, exist_ok=True)
    return out / "work"


def v_scheduler(config) -> DDIMScheduler:
    return DDIMScheduler.from_config(config, prediction_type="v_prediction")


def _fine_tune_v(pipe, latents, captions, config: VariantConfig, out: Path, log: Log, progress: bool) -> None:
    from peft import LoraConfig

    unet, tokenizer, text_encoder = pipe.unet, pipe.tokenizer, pipe.text_encoder
    scheduler = v_scheduler(pipe.scheduler.config)
    pipe.scheduler = scheduler
    with torch.random.fork_rng(devices=[]):  # the adapter's random initialisation comes from the seed
        torch.manual_seed(config.seed)
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                    target_modules=list(LORA_TARGETS)))
    unet.train()
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    num_train = scheduler.config.num_train_timesteps

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (config.batch,), generator=generator)
        x0 = latents[index]
        tokens = ids[index].clone()
        tokens[torch.rand(config.batch, generator=generator) < config.caption_dropout] = empty
        t = torch.randint(0, num_train, (config.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            cond = text_encoder(tokens)[0]
            target = teacher_velocity(unet, scheduler, noisy, t, cond)
        prediction = unet(noisy, t, encoder_hidden_states=cond).sample
        return F.mse_loss(prediction, target)

    fit(unet, loss_of_batch, config, _work(out) / "lora.pt", log, progress, "v-LoRA")
    unet.eval()


def teacher_velocity(unet, scheduler, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The miniature model's own prediction at ``x_t``, turned into a velocity: its noise estimate ``eps`` gives
    ``x0 = (x_t - sigma eps) / alpha`` and ``v = alpha eps - sigma x0 = (eps - sigma x_t) / alpha``
    (``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``). The adapter is switched off for it: the UNet without
    its LoRA is the miniature model.

    Regressing onto this instead of the sampled ``v`` of each training example (whose conditional spread is the
    whole world's at high noise) gives the fine-tune the miniature model's conditional expectation directly: the
    v model then inverts and reconstructs as well as the model it came from."""
    unet.disable_adapters()
    try:
        eps = unet(noisy, t, encoder_hidden_states=cond).sample
    finally:
        unet.enable_adapters()
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (eps - (1 - abar).sqrt() * noisy) / abar.sqrt()


def save_v_adapter(pipe, folder: Path) -> None:
    """The UNet's LoRA (fp16, diffusers' LoRA file) and the v-prediction scheduler config."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(pipe.unet)  # PEFT's key names, which diffusers' LoRA loader reads as is
    layers = {name: t.detach().to(torch.float16).contiguous() for name, t in layers.items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=LORA_FILE)
    pipe.scheduler.save_pretrained(folder / "scheduler")




