"""The web UI's server side without the page: one loaded model, one job at a time, the edits made so far and
their stages, the output folder.

Gradio-free, so that its rules (what an upload may be, what is written where, that a slider move is stage C
alone, that Cancel keeps the stage cache whole) are tested without a browser; :mod:`.app` puts a page on it.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import Cancelled, UsageError
from ..images import check_image, open_image
from ..methods.output import slugify, variant_filename
from ..progress import Reporter

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
KEPT_EDITS = 16  # edits whose stages stay in memory for slider moves
CLOSED_KEPT = 1024  # closed pages remembered, so that a job one of them left in the queue stops at once
EXAMPLES = Path(__file__).parent / "examples"


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded: the CLI's runtime flags (see ``nonrigid ui --help``)."""

    device: str | None = None
    dtype: str | None = None
    low_memory: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    allow_pickle: bool = False
    config: str | None = None
    t5: bool = True  # SD3: load the T5 encoder


@dataclass
class EditOutcome:
    """A finished edit as the page shows it."""

    key: str  # names the edit for later slider moves (its folder's name)
    folder: Path
    grid: Path
    variants: list[tuple[Path, str]]  # (PNG, caption) in grid order
    archive: Path  # the whole folder as one zip
    method: str
    seeds: tuple[int, ...]
    seconds: float
    timings: dict[str, float]
    resampleable: bool  # ours: stages A and B are kept for the sliders
    etas: tuple[float, ...] = ()
    inject: tuple[float, ...] = ()


@dataclass
class SliderOutcome:
    """One variant sampled from a finished edit's stages."""

    image: Path
    seconds: float
    sampled_steps: int  # N - K: the UNet steps it took
    num_steps: int


@dataclass
class _Kept:
    stages: Any
    folder: Path


@dataclass
class Editor:
    """The loaded model and everything the page does with it. Every model call holds :attr:`lock`: methods
    change attention processors or copy the UNet, so two jobs never share the model at once."""

    model: str
    out: Path
    options: ModelOptions = field(default_factory=ModelOptions)
    cache_dir: Path | None = None
    use_cache: bool = True
    family: Any = None  # the loaded model (its ModelFamily), resolved once on loading
    lock: threading.Lock = field(default_factory=threading.Lock)
    _kept: OrderedDict[str, _Kept] = field(default_factory=OrderedDict)
    _cancelled: set[str] = field(default_factory=set)
    _closed: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"out {self.out} is a file; give a folder for the page's edits")

    # ---- the model

    def load(self, model: str | None = None) -> str:
        """Load ``model`` (default: :attr:`model`) and make it the page's model; returns its description."""
        from ..models.loading import configure_model, load_model

        name = (model or self.model).strip()
        if not name:
            raise UsageError("give a model: a hub id, a folder, a single file or a built-in name such as mini")
        with self.lock:
            o = self.options
            loaded = load_model(name, o.device, o.dtype, allow_pickle=o.allow_pickle, config=o.config, t5=o.t5)
            self.family = configure_model(loaded, low_memory=o.low_memory, compile=o.compile,
                                          cuda_graphs=o.cuda_graphs)
            self.model = name
            self._kept.clear()  # stages belong to the model that made them
        return self.describe()

    def describe(self) -> str:
        return f"{self.model} ({self.family.describe()})"

    @property
    def native_size(self) -> int:
        return self.family.defaults.size

    # ---- cancelling

    def cancel(self, session: str) -> None:
        """Ask ``session``'s running job to stop at its next step."""
        self._cancelled.add(session)

    def close_page(self, session: str) -> None:
        """``session``'s page is gone (its tab closed or reloaded): nobody will see its jobs' results, so its running
        job stops at its next step, as Cancel stops it, and a job it left in the queue stops at its first."""
        self._closed[session] = None
        while len(self._closed) > CLOSED_KEPT:
            self._closed.popitem(last=False)

    def reporter(self, session: str, show: Callable[[str, int, int], None] | None = None) -> Reporter:
        """A progress reporter for ``session``'s job: passes progress to ``show`` and raises
        :class:`~nonrigid.errors.Cancelled` once the session asked to cancel, or its page was closed."""
        self._cancelled.discard(session)  # a new job starts uncancelled

        def report(stage: str, done: int, total: int) -> None:
            if session in self._closed:
                raise Cancelled("the page was closed; nothing of the unfinished stage was kept")
            if session in self._cancelled:
                self._cancelled.discard(session)
                raise Cancelled("cancelled; nothing of the unfinished stage was kept")
            if show is not None:
                show(stage, done, total)

        return report

    # ---- jobs

    def edit(
        self,
        image: str | Path,
        target_prompt: str,
        *,
        method: str = "ours",
        params: Mapping[str, Any] | None = None,
        source_prompt: str = "",
        seeds: tuple[int, ...] = (0,),
        size: int | None = None,
        crop: str | None = None,
        fast: bool = False,
        mask: Any = None,
        progress: Reporter | bool = False,
        instruction: str | None = None,
    ) -> EditOutcome:
        """Edit an uploaded image and write it to a new folder under :attr:`out` in the CLI's layout (plus a zip).
        ``mask`` (an array of any size: white may change) is painted on the whole picture; a canvas of another
        size than the picture is resized to it. ``fast``: the method's fast preset (ours'), under ``params``.
        ``instruction``: for the methods that follow one (kontext, qwen-edit; None: made from the target prompt);
        the others ignore it."""
        from ..methods.output import save_result
        from ..methods.run import EditRequest, run_edits
        from ..stages.cache import StageCache

        path = check_upload(image)
        picture = open_image(path, name=path.name)  # decoded once: a truncated file fails here
        target_prompt = target_prompt.strip()
        if not target_prompt:
            raise UsageError("write a target prompt: what the picture should show, e.g. a photo of a jumping dog")
        with self.lock:
            cache = StageCache(self.cache_dir) if self.use_cache else None
            request = EditRequest(picture, target_prompt, source_prompt.strip(), _on_picture(mask, picture),
                                  instruction)
            (result,) = run_edits(self.family, [request], method, params or {}, seeds=seeds,
                                  size=None if size is None else int(size), crop=crop, cache=cache,
                                  preset="fast" if fast else None, progress=progress)
            folder = self._new_folder(path, target_prompt, method)
            save_result(result, folder, record={"image": path.name, "model": self.model,
                                                "size": result.input_image.width, "made_in": "nonrigid ui"})
            if result.stages is not None:
                self._keep(folder.name, _Kept(result.stages, folder))
        archive = zip_folder(folder)
        variants = [(folder / variant_filename(v.seed, v.knobs), _caption(v.seed, v.knobs)) for v in result.variants]
        params_used = result.params
        return EditOutcome(
            key=folder.name, folder=folder, grid=folder / "grid.png", variants=variants, archive=archive,
            method=method, seeds=result.seeds, seconds=result.timings["total"], timings=result.timings,
            resampleable=result.stages is not None, etas=tuple(params_used.get("etas", ())),
            inject=tuple(params_used.get("inject", ())),
        )

    def resample(
        self, key: str, seed: int, eta: float, inject: float, progress: Reporter | bool = False
    ) -> SliderOutcome:
        """Another (eta, inject) variant of edit ``key`` from its kept stages: stage C alone, (N - K) of N steps."""
        from ..methods.ours import resample

        kept = self._kept.get(key)
        if kept is None:
            raise UsageError("that edit's stages are no longer in memory (a newer model or many newer edits); "
                             "press Edit again")
        with self.lock:
            tick = time.perf_counter()
            ((variant,),) = resample(self.family, [kept.stages], (float(eta),), (float(inject),), [(int(seed),)],
                                     progress=progress)
            seconds = time.perf_counter() - tick
            path = kept.folder / "slider" / variant_filename(variant.seed, variant.knobs)
            _save_png_atomically(variant.image, path)
        num_steps = kept.stages.inversion.num_steps
        return SliderOutcome(path, seconds, num_steps - variant.knobs["K"], num_steps)

    def generate(
        self, prompt: str, *, seed: int = 0, num_steps: int = 50, guidance_scale: float | None = None,
        size: int | None = None, progress: Reporter | bool = False,
    ) -> Path:
        """An input made by the loaded model from ``prompt`` and ``seed``, saved under ``out/generated``."""
        from ..stages.sampling import generate

        prompt = prompt.strip()
        if not prompt:
            raise UsageError("write a source prompt: what the generated picture should show")
        if not 1 <= int(num_steps) <= 1000:
            raise UsageError(f"steps must be between 1 and 1000, got {num_steps}")
        with self.lock:
            image = generate(self.family, prompt, seed=int(seed), num_steps=int(num_steps),
                             guidance_scale=guidance_scale, size=size, progress=progress)
        path = self.out / "generated" / f"{slugify(prompt, 48, 'image')}-seed{int(seed)}.png"
        _save_png_atomically(image, path)
        return path

    # ---- bookkeeping

    def _keep(self, key: str, kept: _Kept) -> None:
        self._kept[key] = kept
        while len(self._kept) > KEPT_EDITS:
            self._kept.popitem(last=False)

    def _new_folder(self, image: Path, prompt: str, method: str) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        suffix = "" if method == "ours" else f"-{method}"
        base = f"{stamp}-{slugify(image.stem, 24, 'image')}-{slugify(prompt, 40, 'edit')}{suffix}"
        folder, n = self.out / base, 1
        while folder.exists():
            n += 1
            folder = self.out / f"{base}-{n}"
        return folder


def check_upload(image: str | Path | None) -> Path:
    """An uploaded file the page accepts: at most 50 MB, an image Pillow reads, at most 10,000 px a side.

    Checked from the file's size and header before any pixel is decoded, so a huge or hostile upload costs
    nothing; the messages are what the page shows, and name the file as uploaded, not where the server keeps it.
    No file (nothing uploaded, or an upload the server refused: over 50 MB) asks for one.
    """
    if not image or not Path(image).is_file():
        raise UsageError("upload an image first (or pick an example)")
    path = Path(image)
    megabytes = path.stat().st_size / 1024 / 1024
    if megabytes > MAX_UPLOAD_BYTES / 1024 / 1024:
        raise UsageError(f"that file is {megabytes:.0f} MB; images up to 50 MB are accepted")
    check_image(path, name=path.name)  # the header alone; decoding it (open_image) then finds a truncated file
    return path


def zip_folder(folder: Path) -> Path:
    """``folder`` (an edit: PNGs and edit.json) as ``folder.zip`` beside it, written atomically."""
    archive = folder.with_suffix(".zip")
    partial = folder.with_name(f".{folder.name}.zip.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, Path(folder.name) / file.relative_to(folder))
    partial.replace(archive)
    return archive


def examples() -> list[dict[str, str]]:
    """The bundled examples: miniature-world scenes with a source caption and a target prompt."""
    listing = json.loads((EXAMPLES / "examples.json").read_text())
    return [{**item, "image": str(EXAMPLES / item["image"])} for item in listing]


def _caption(seed: int, knobs: Mapping[str, int | float]) -> str:
    return ", ".join([f"seed {seed}", *(f"{k} {v:g}" for k, v in knobs.items())])


def _save_png_atomically(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG")
    partial.replace(path)


def _on_picture(mask: Any, picture: Image.Image) -> np.ndarray | None:
    """A mask painted on a smaller canvas of the whole picture, at the upright picture's size."""
    if mask is None:
        return None
    size = ImageOps.exif_transpose(picture).size
    values = np.asarray(mask)
    if values.ndim == 3:
        values = values.max(axis=-1)
    return np.asarray(Image.fromarray(values.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
