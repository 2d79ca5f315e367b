"""On-disk cache of stage results, so another eta or inject ratio costs seconds instead of minutes.

An entry is one safetensors file named by the hash of everything the stage's result depends on (model
fingerprint, preprocessed image, prompt, stage parameters, seed, dtype, device type). Its metadata carries a
sha256 of the tensors: a truncated or corrupted entry fails to parse or to verify, is deleted and recomputed,
never used. Writes go to a temporary file that is renamed into place, so a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import platformdirs
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

logger = logging.getLogger("nonrigid")

CACHE_ENV = "NONRIGID_CACHE_DIR"
FORMAT_VERSION = 2  # 2: conditionings stored as named tensors ("target.tokens")


def default_cache_dir() -> Path:
    """``$NONRIGID_CACHE_DIR`` if set, else the platform's user cache directory (e.g. ~/.cache/nonrigid)."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("nonrigid"))


def stage_key(stage: str, **fields) -> str:
    """Hash of a stage name and the JSON of everything its result depends on."""
    payload = json.dumps({"stage": stage, "format": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class StageCache:
    """A folder of stage results: ``load`` returns ``(tensors, meta)`` or None; ``save`` stores them atomically."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.safetensors"

    def load(self, stage: str, key: str, device: torch.device | str = "cpu") -> tuple[dict, dict] | None:
        path = self.path(stage, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = load_safetensors(data)
            header = _read_metadata(data)
            meta = json.loads(header["meta"])
            if header.get("sha256") != _digest(tensors):
                raise ValueError("checksum mismatch")
        except Exception as err:  # any parse or verify failure means the entry cannot be trusted
            logger.warning("cache entry %s is corrupt (%s); recomputing it", path, err)
            path.unlink(missing_ok=True)
            return None
        return {name: t.to(device) for name, t in tensors.items()}, meta

    def save(self, stage: str, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        metadata = {"meta": json.dumps(meta), "sha256": _digest(tensors)}
        data = save_safetensors(tensors, metadata=metadata)
        path = self.path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header after an 8-byte length)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})
