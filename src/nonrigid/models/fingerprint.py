"""Short hashes that change when a model's weights change: the model part of every cache key and record."""

from __future__ import annotations

import hashlib
import json

from torch import nn


def weights_fingerprint(module: nn.Module, prefix: str = "", digest=None) -> str:
    """Hash of every tensor's name, shape, dtype and a strided sample of its values (milliseconds even at 1 B
    parameters; any fine-tune or other checkpoint changes the sample)."""
    digest = digest or hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{prefix}{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short hash that changes when any network's weights (or their dtype) or the noise schedule change.
    ``model``: a :class:`~nonrigid.models.family.ModelFamily`, or a loaded pipeline (its family is found)."""
    from .registry import family_of

    family = family_of(model)
    digest = hashlib.sha256()
    for module_name, module in family.modules().items():
        weights_fingerprint(module, f"{module_name}.", digest)
    schedule = {k: v for k, v in family.pipe.scheduler.config.items() if not k.startswith("_")}  # "_…" vary by run
    digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
