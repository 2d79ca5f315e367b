"""Training settings of the miniature model (torch-free, so the CLI can show them at once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    subject_weight: float = 8.0
    kl_weight: float = 1e-6
    dataset_size: int = 20000
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 100
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.995
    checkpoint_every: int = 100


@dataclass
class VariantConfig:
    """Training settings of the miniature world's other denoisers (``mini-v``, ``mini-xl``)."""

    seed: int = 0
    threads: int = 2
    steps: int = 600
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    rank: int = 32  # LoRA rank (mini-v)
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.99
    checkpoint_every: int = 100
    dataset_size: int = 20000
