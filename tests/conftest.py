"""Shared fixtures: the tiny random model (exact properties), the trained model (quality properties), data."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
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


@pytest.fixture
def nonrigid_logger():
    """The command line configures the "nonrigid" logger; later tests need it as it was."""
    logger = logging.getLogger("nonrigid")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


def weight_differences(expected, actual, modules: Iterable[str]) -> list[str]:
    """Every network tensor that is missing, extra, never loaded or not bit-identical, as ``module.key (why)``."""
    problems = []
    for module in modules:
        want = getattr(expected, module).state_dict()
        got = getattr(actual, module).state_dict()
        problems += [f"{module}.{key} (missing)" for key in want.keys() - got.keys()]
        problems += [f"{module}.{key} (unexpected)" for key in got.keys() - want.keys()]
        for key in sorted(want.keys() & got.keys()):
            a, b = want[key], got[key]
            if b.device.type == "meta":
                problems.append(f"{module}.{key} (never loaded)")
            elif a.shape != b.shape or a.dtype != b.dtype:
                problems.append(f"{module}.{key} ({a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)})")
            elif not torch.equal(a, b.to(a.device)):
                problems.append(f"{module}.{key} (values differ)")
    return problems


def write_bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A 69-byte PNG whose header claims ``width`` x ``height`` px, as a decompression bomb's does. Its few pixel
    bytes fill no such image: decoding it ends in a "truncated" error, so only a check of the header itself gives
    the size message."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path
