"""Training the miniature model: the VAE first, then the UNet and text encoder together on its latents.

Reproducible from a seed (data, initialisation and noise all come from seeded generators; the number of CPU
threads is fixed), resumable (a checkpoint every ``checkpoint_every`` steps holds weights, optimiser and RNG
state; a rerun continues from it), and logged step by step. The trained pipeline is saved in fp16 (the package
data budget is 20 MB) and loaded back as fp32.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from ..stages.cache import write_atomic
from ..timing import Stopwatch
from .config import TrainConfig
from .model import build_untrained_pipeline
from .world import random_scene, render, render_with_mask


def render_batch(rng: random.Random, count: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` random scenes as a (count, 3, 64, 64) tensor in [-1, 1] and their captions."""
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), [s.caption for s in scenes]


def render_batch_with_masks(rng: random.Random, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`render_batch`, with the subjects' coverage (count, 1, 64, 64) instead of captions."""
    rendered = [render_with_mask(random_scene(rng)) for _ in range(count)]
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image, _ in rendered]) / 127.5 - 1.0
    masks = np.stack([mask for _, mask in rendered])[:, None]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), torch.from_numpy(masks)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Log:
    """Appends lines to a log file and echoes them."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print):
        self.path, self.echo = path, echo
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        with self.path.open("a") as handle:
            handle.write(message + "\n")
        if self.echo:
            self.echo(message)


def train(out: Path, config: TrainConfig, *, progress: bool = True, log: Log | None = None) -> Path:
    """Train both stages into ``out`` (checkpoints under ``out/work``) and save the pipeline to ``out/model``.

    Runs on ``config.threads`` CPU threads (fixed, for reproducibility) and gives the process its thread count
    back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_stages(out, config, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train_stages(out: Path, config: TrainConfig, progress: bool, log: Log | None) -> Path:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = log or Log(out / "train_log.txt")
    watch = Stopwatch()
    log(f"config {json.dumps(asdict(config))}")
    pipe = build_untrained_pipeline(config.seed)
    with watch("vae"):
        train_vae(pipe, config, work, log, progress)
    log(f"vae stage: {watch.seconds['vae'] / 60:.1f} min")
    with watch("dataset"):
        latents, captions = encode_dataset(pipe, config, work, log, progress)
    log(f"dataset stage: {watch.seconds['dataset'] / 60:.1f} min")
    with watch("unet"):
        train_unet(pipe, latents, captions, config, work, log, progress)
    log(f"unet stage: {watch.seconds['unet'] / 60:.1f} min")
    model_dir = out / "model"
    save_pipeline_fp16(pipe, model_dir)
    log(f"done in {watch.total() / 60:.1f} min; model saved to {model_dir}")
    return model_dir


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path) -> dict | None:
    # weights_only: our own checkpoints hold tensors, numbers and strings only; nothing is unpickled as code
    return torch.load(path, weights_only=True) if path.exists() else None


def train_vae(pipe, config: TrainConfig, work: Path, log: Log, progress: bool) -> None:
    """Reconstruction (L1 + MSE) plus a small KL term, on freshly rendered scenes every step.

    The animal covers a few percent of the image but carries the pose, so its pixels weigh ``subject_weight``
    times more: an unweighted loss is satisfied by a blurred blob."""
    vae = pipe.vae
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    path = work / "vae.pt"
    state = _load_checkpoint(path)
    start = 0
    rng = random.Random(config.seed * 1000 + 1)
    generator = torch.Generator().manual_seed(config.seed * 1000 + 2)
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        rng.setstate(_py_state(state["py_rng"]))
        generator.set_state(state["torch_rng"])
        log(f"vae: resuming at step {start}")
    bar = tqdm(range(start, config.vae_steps), desc="VAE", disable=not progress, initial=start,
               total=config.vae_steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * cosine_lr(step, config.vae_steps, config.warmup)
        pixels, masks = render_batch_with_masks(rng, config.vae_batch)
        dist = vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        weight = 1.0 + config.subject_weight * masks
        diff = recon - pixels
        rec = ((diff.abs() + diff**2) * weight).mean() / weight.mean()
        kl = dist.kl().mean()
        loss = rec + config.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step} rec {rec.item():.4f} kl {kl.item():.1f}")
        if (step + 1) % config.checkpoint_every == 0 or step == config.vae_steps - 1:
            _save_checkpoint(path, {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                                    "py_rng": _py_state_tensor(rng), "torch_rng": generator.get_state()})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(pipe, config: TrainConfig, work: Path, log: Log, progress: bool):
    """Render ``dataset_size`` scenes once, encode them to (mean) latents, and fix the latent scale to 1/std."""
    path = work / "dataset.pt"
    state = _load_checkpoint(path)
    if state is None:
        rng = random.Random(config.seed * 1000 + 3)
        latents, captions = [], []
        for _ in tqdm(range(0, config.dataset_size, 250), desc="encoding dataset", disable=not progress):
            pixels, text = render_batch(rng, 250)
            latents.append(pipe.vae.encode(pixels).latent_dist.mean)
            captions.extend(text)
        latents = torch.cat(latents)[: config.dataset_size]
        state = {"latents": latents, "captions": json.dumps(captions[: config.dataset_size])}
        _save_checkpoint(path, state)
    latents = state["latents"]
    scale = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    log(f"dataset: {latents.shape[0]} latents {tuple(latents.shape[1:])}, scaling_factor {scale:.5f}")
    return latents * scale, json.loads(state["captions"])


def train_unet(pipe, latents: torch.Tensor, captions: list[str], config: TrainConfig, work: Path, log: Log,
               progress: bool) -> None:
    """The standard epsilon objective on the latents, text encoder trained jointly, captions dropped 10% of the
    time (so classifier-free guidance has an unconditional model), EMA weights kept for the result."""
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    scheduler = pipe.scheduler
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    modules.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.unet_lr, weight_decay=0.01)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(config.seed * 1000 + 4)
    path = work / "unet.pt"
    start = 0
    state = _load_checkpoint(path)
    if state is not None:
        modules.load_state_dict(state["model"])
        ema = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["torch_rng"])
        start = int(state["step"])
        log(f"unet: resuming at step {start}")
    num_train = scheduler.config.num_train_timesteps
    bar = tqdm(range(start, config.unet_steps), desc="UNet", disable=not progress, initial=start,
               total=config.unet_steps)
    running = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.unet_lr * cosine_lr(step, config.unet_steps, config.warmup)
        index = torch.randint(0, latents.shape[0], (config.unet_batch,), generator=generator)
        x0 = latents[index]
        tokens = ids[index].clone()
        drop = torch.rand(config.unet_batch, generator=generator) < config.caption_dropout
        tokens[drop] = empty
        t = torch.randint(0, num_train, (config.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(tokens)[0]
        error = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise, reduction="none")
        loss = (error.mean(dim=(1, 2, 3)) * timestep_weights(scheduler, t, config.snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for k, v in modules.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0 or step == config.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} avg {running:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step == config.unet_steps - 1:
            _save_checkpoint(path, {"model": modules.state_dict(), "ema": ema, "optimizer": optimizer.state_dict(),
                                    "torch_rng": generator.get_state(), "step": step + 1})
    modules.load_state_dict(ema)
    modules.eval().requires_grad_(False)


def timestep_weights(scheduler, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for the epsilon objective, min(SNR(t), gamma) / SNR(t) (Hang et al. 2023).

    Nearly clean timesteps have a large SNR and an easy, noisy epsilon target that dominates the plain loss;
    capping their weight spends the little training this model gets on the noise levels where layout, pose and
    kind are decided. ``snr_gamma`` 0 gives the plain loss (all weights 1)."""
    if snr_gamma <= 0:
        return torch.ones(t.shape)
    snr = compute_snr(scheduler, t)
    return snr.clamp(max=snr_gamma) / snr


def save_pipeline_fp16(pipe, folder: Path) -> None:
    """Save as a diffusers folder with fp16 weights (half the bytes; ``load_pipeline`` upcasts to fp32)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # diffusers warns on every .to(fp16) that it has nothing to keep in fp32
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    try:
        for module in modules:
            module.to(torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:  # the caller's pipeline is fp32 again even when saving fails
        for module in modules:
            module.to(torch.float32)
        diffusers_logging.set_verbosity(verbosity)


def _py_state_tensor(rng: random.Random) -> torch.Tensor:
    version, internal, gauss = rng.getstate()
    return torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)


def _py_state(tensor: torch.Tensor) -> tuple:
    values = tensor.tolist()
    return values[0], tuple(values[1:-1]), None


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
