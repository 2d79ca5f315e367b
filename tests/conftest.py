"""Shared fixtures: the tiny random model (exact properties), the trained model (quality properties), data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nonrigid.images import load_image
from nonrigid.models.loading import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NONRIGID_SHARED", ROOT.parent / "shared"))
TEDBENCH = SHARED / "data" / "tedbench"

# two threads on a 2-core runner; OMP_NUM_THREADS (e.g. 1 when several suites share the machine) wins
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tedbench() -> Path:
    if not (TEDBENCH / "input_list.json").is_file():
        pytest.skip(f"TEdBench not found at {TEDBENCH} (expected ../shared beside the project)")
    return TEDBENCH


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny random-weight SD-1.x-shaped pipeline, fp32 on CPU. Tests must not modify it."""
    return load_pipeline("tiny", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def dog_image(tedbench):
    return load_image(tedbench / "originals" / "dog_01.jpeg", size=64)


@pytest.fixture(scope="session")
def model():
    """A pipeline that actually denoises, for quality properties.

    Random weights are no denoiser (a DDIM round trip on the tiny model misses the input latent by more than the
    latent's own spread), so these tests need the trained miniature model of the miniature-world issue.
    """
    try:
        return load_pipeline("mini", device="cpu", dtype="fp32")
    except Exception as err:
        pytest.skip(f"needs the trained miniature model ('mini', miniature-world issue): {err}")


@pytest.fixture(scope="session")
def model_image(model):
    """An image the trained model can represent: one of its own world's scenes."""
    from nonrigid.mini.world import render_example

    return render_example(seed=0)
