"""Weight files of the metrics' networks: finding them, fetching them once, checking and reading them."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ...errors import UsageError, first_line

logger = logging.getLogger("nonrigid")


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def existing_file(path: str | os.PathLike, what: str, source: str | None = None) -> Path:
    """``path`` if it is a file; else a one-line error saying what belongs there (and where it comes from)."""
    file = Path(path).expanduser()
    if not file.is_file():
        origin = f" (from {source})" if source else ""
        raise UsageError(f"{what} not found at {file}: put the file there{origin} or give the path of your copy")
    return file


def download(url: str, destination: Path, sha256: str, what: str, how_to_pass: str) -> None:
    """Fetch ``url`` once into ``destination`` (written to a temporary file, hash-checked, then renamed)."""
    logger.info("downloading %s from %s to %s (once)", what, url, destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256, progress=False)
    except Exception as err:  # offline, refused, or a bad hash: all mean "put the file there yourself"
        raise UsageError(
            f"{destination.name} ({what}) is not at {destination} and could not be downloaded "
            f"({first_line(err)}); put the file from {url} there, or pass {how_to_pass}"
        ) from err
    if len(sha256) == 64 and file_sha256(destination) != sha256:  # belt and braces: never keep a wrong file
        destination.unlink(missing_ok=True)
        raise UsageError(f"the download of {url} does not have the expected sha256; {what} was not installed")


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` pickle, rebuilding tensors only (``weights_only``: no arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"could not read {what} from {path}: {first_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} does not hold a state dict of tensors ({what} expected)")
    return state
