"""What loading reads from a diffusers folder's or a hub repository's ``model_index.json`` before diffusers loads
the pipeline, and how it reaches the hub: one short probe, so an offline machine is told at once in one line.

Torch-free; diffusers and huggingface_hub are imported where a function needs them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError, first_line


def model_index(source: str) -> dict:
    """A config folder's or hub id's ``model_index.json`` (component name -> [library, class])."""
    import json
    import warnings

    from diffusers import DiffusionPipeline

    folder = Path(source).expanduser()
    try:
        if folder.is_dir():
            return json.loads((folder / "model_index.json").read_text())
        with warnings.catch_warnings():  # huggingface_hub deprecation chatter from diffusers' call
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(source)
    except Exception as err:
        raise UsageError(f"could not read the config {source!r} ({first_line(err)}); connect once to download it, "
                         "or pass a local diffusers folder of the same model as config") from err


def component_class(entry: list):
    """The class a ``model_index.json`` entry ([library, class]) names."""
    import importlib

    return getattr(importlib.import_module(entry[0]), entry[1])


def index_has(index: Path, component: str) -> bool:
    """Whether a folder's ``model_index.json`` names ``component`` (a pipeline saved without T5 does not)."""
    import json

    try:
        entry = json.loads(index.read_text()).get(component)
    except (OSError, ValueError):
        return True  # from_pretrained says what is wrong with the folder
    return bool(entry) and entry[0] is not None


def hub_class_name(repo: str, local_files_only: bool = False) -> str | None:
    """The pipeline class named by a hub repository's ``model_index.json`` (fetched into the hub cache)."""
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # huggingface_hub deprecation chatter from diffusers' call, not the user's
        warnings.simplefilter("ignore")
        return DiffusionPipeline.load_config(repo, local_files_only=local_files_only).get("_class_name")


HUB_PROBE_SECONDS = 3.0


def hub_access(repo: str) -> dict[str, bool]:
    """How to read hub repository ``repo`` (keyword arguments for diffusers' loaders): over the network, or from the
    hub cache alone when the hub cannot be reached or ``HF_HUB_OFFLINE`` is set; refused in one line when the cache
    lacks it.

    One short probe of the hub tells an offline machine at once: without it, huggingface_hub retries each file for
    half a minute and diffusers then says the repository lacks ``model_index.json``, hiding the cause.
    """
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache

    offline = is_offline_mode()
    if not offline and hub_answers(constants.ENDPOINT):
        return {}
    if isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
        return {"local_files_only": True}
    if offline:
        raise UsageError(f"HF_HUB_OFFLINE is set and model {repo} is not in the hub cache; unset it and connect once "
                         "to download the model, or give a local diffusers folder or .safetensors file")
    raise UsageError(f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached to download model {repo}; "
                     "connect once, or give a local diffusers folder or .safetensors file (HF_HUB_OFFLINE=1 loads "
                     "models already in the hub cache without trying the network)")


def hub_answers(endpoint: str) -> bool:
    """Whether the hub answers within :data:`HUB_PROBE_SECONDS` (any answer counts, an error page too)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS)
    except Exception:  # refused, no route, no name, timed out, a proxy's refusal: whatever the HTTP client raises
        return False
    return True


def index_class(index: Path) -> str | None:
    import json

    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None  # from_pretrained says what is wrong with the folder
