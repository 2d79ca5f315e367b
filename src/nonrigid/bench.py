"""The benchmark: every (pair, method, setting) of a TEdBench-layout folder, resumable, one SQLite row per edit.

A *job* is one :func:`~nonrigid.methods.run.run_method` call: one pair, one method, one *setting* (a value of
every swept non-sweep parameter, e.g. ``opt_steps=100``), all seeds and all values of the method's own sweep
parameters at once (ours shares stages A and B across every eta and injection ratio). Each of its variants is one
row of ``results.sqlite`` in the run folder:

    run.json          what the run computes (data, pairs, methods, settings, seeds, model, metrics); a rerun with
                      a different command is refused instead of mixed in
    results.sqlite    tables ``edits`` (one row per edited image), ``jobs`` (one per finished job),
                      ``stage_entries`` (cache entries written by finished jobs), ``meta``
    images/<method>/<setting>/<pair>/seed0_K10_eta0.20.png
    inputs/<pair>.png the preprocessed input every edit of that pair is scored against
    cache/            the stage cache, so a restarted run reuses finished stages

Crash safety, SIGKILL included: images are written atomically (temporary file, then rename) before the job's
rows, and a job's rows are inserted in one transaction together with its ``jobs`` row, so a job is either wholly
in the database, with all its images on disk, or not at all. A rerun skips the jobs in ``jobs`` and redoes the
others, overwriting their orphan images. Stage cache entries only count once the job that wrote them is committed
(:class:`RunCache`): a job that was killed half-way sees exactly the cache a clean run would have shown it, so
the resumed run ends with the same rows and the same image bytes as an uninterrupted one.

``score_folder`` scores edits made elsewhere (named ``<image name>-<target text>.png`` like TEdBench's published
Imagic results) into the same kind of run folder. Torch-free at import: commands validate before loading models.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import itertools
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import UsageError
from .methods import METHODS, method_info
from .methods.base import MethodInfo, Param, resolve_params
from .options import DEFAULT_MODEL

logger = logging.getLogger("nonrigid")

CONFIG_FILE = "run.json"
DATABASE_FILE = "results.sqlite"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1
METRIC_NAMES = ("clip_t", "lpips", "aesthetic")
SOURCE_MODES = ("none", "pair")  # source prompt of a job: empty (the paper's default) or the pair's caption
SOURCE_KEY = "source"
SCORE_BATCH = 16  # outside edits scored and committed together
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Columns of ``edits`` that legitimately differ between two runs of the same command (time, cache hits).
VOLATILE_COLUMNS = ("job_seconds", "seconds_per_edit", "timings", "cache", "created_at")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, pair INTEGER NOT NULL, method TEXT NOT NULL, setting TEXT NOT NULL,
    params TEXT NOT NULL, edits INTEGER NOT NULL, seconds REAL, timings TEXT, cache TEXT, record TEXT,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL REFERENCES jobs(job),
    pair INTEGER NOT NULL, image_name TEXT NOT NULL, target_text TEXT NOT NULL, source_prompt TEXT NOT NULL,
    method TEXT NOT NULL, setting TEXT NOT NULL, seed INTEGER NOT NULL, knobs TEXT NOT NULL, params TEXT NOT NULL,
    clip_t REAL, lpips REAL, aesthetic REAL,
    image TEXT NOT NULL UNIQUE, record TEXT NOT NULL,
    job_seconds REAL, seconds_per_edit REAL, timings TEXT, cache TEXT, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_entries (stage TEXT NOT NULL, key TEXT NOT NULL, job TEXT NOT NULL,
    PRIMARY KEY (stage, key));
"""
JSON_COLUMNS = ("knobs", "params", "record", "timings", "cache")


# --------------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Pair:
    """One (input image, target text) pair of a TEdBench-layout folder; ``index`` is its place in input_list."""

    index: int
    img_name: str
    image: Path
    target_text: str
    source_text: str = ""  # a caption of the input: the source prompt of settings that use one
    source_origin: str = ""  # where that caption comes from: "sources", "input list", "ground truth", "file name"

    @property
    def slug(self) -> str:
        return f"{self.index:03d}-{slugify(Path(self.img_name).stem)}"


def slugify(text: str, limit: int = 60) -> str:
    """File-name-safe lower-case words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "x"


def caption_from_filename(img_name: str) -> str:
    """A last-resort source prompt from a file name: ``dog2_standing.png`` -> ``A photo of dog standing.``

    TEdBench gives no captions of its inputs; trailing digits and tokens with digits in them (hashes, sizes) are
    dropped.
    """
    words = []
    for token in re.split(r"[^A-Za-z0-9]+", Path(img_name).stem):
        token = token.rstrip("0123456789")
        if len(token) > 1 and not any(c.isdigit() for c in token):
            words.append(token.lower())
    return f"A photo of {' '.join(words) or 'an object'}."


def read_pairs(data: str | os.PathLike, sources: str | os.PathLike | None = None) -> list[Pair]:
    """The pairs of ``data/input_list.json`` with their images in ``data/originals/``.

    Source captions come from ``sources`` (a JSON object: image name or stem -> caption), else a ``source_text``
    field of the input list's entries, else the miniature world's ``ground_truth.json``, else the file name
    (:func:`caption_from_filename`). They are only used by settings with ``source=pair``.
    """
    data = Path(data)
    listing = data / "input_list.json"
    if not listing.is_file():
        raise UsageError(f"{data} has no input_list.json; give a folder in TEdBench's layout (input_list.json + "
                         "originals/)")
    try:
        listed = json.loads(listing.read_text())
    except ValueError as err:
        raise UsageError(f"{listing} is not valid JSON ({err})") from None
    if not isinstance(listed, list) or not all(isinstance(e, dict) and {"img_name", "target_text"} <= set(e)
                                               for e in listed):
        raise UsageError(f"{listing} must be a list of {{img_name, target_text}} objects, as in TEdBench")
    entries = [(str(e["img_name"]), str(e["target_text"]), e.get("source_text")) for e in listed]
    captions = _source_captions(data, sources)
    pairs = []
    for index, (img_name, target, source) in enumerate(entries):
        image = data / "originals" / img_name
        if not image.is_file():
            raise UsageError(f"{listing} names {img_name}, which is not in {data / 'originals'}")
        found = [("sources", captions.get(img_name) or captions.get(Path(img_name).stem)), ("input list", source),
                 ("ground truth", captions.get((img_name, target))), ("file name", caption_from_filename(img_name))]
        origin, caption = next((origin, text) for origin, text in found if text)
        pairs.append(Pair(index, img_name, image, target, str(caption), origin))
    if not pairs:
        raise UsageError(f"{listing} lists no pairs")
    return pairs


def _source_captions(data: Path, sources: str | os.PathLike | None) -> dict:
    captions: dict = {}
    truth = data / "ground_truth.json"  # the miniature world's dataset knows every scene's caption
    if truth.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for p in json.loads(truth.read_text())["pairs"]:
                captions[(p["img_name"], p["target_text"])] = p["source_text"]
    if sources is not None:
        try:
            given = json.loads(Path(sources).read_text())
        except (OSError, ValueError):
            given = None
        if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
            raise UsageError(f"--sources {sources} must be a JSON file with an object mapping image names to captions")
        captions.update(given)
    return captions


def uses_source_captions(settings: Mapping[str, Sequence[Setting]]) -> bool:
    return any(s.source == "pair" for method_settings in settings.values() for s in method_settings)


def select_pairs(pairs: Sequence[Pair], spec: str | None = None, limit: int | None = None) -> list[Pair]:
    """``spec``: comma-separated indices (0-based, as in input_list.json), ranges ``3-7`` and image names or
    stems (every pair of that image); then the first ``limit`` of those."""
    chosen = list(pairs)
    if spec:
        wanted: dict[int, None] = {}
        for token in (t.strip() for t in spec.split(",")):
            if not token:
                continue
            if re.fullmatch(r"\d+(-\d+)?", token):
                low, _, high = token.partition("-")
                indices = range(int(low), int(high or low) + 1)
                if not indices or indices[-1] >= len(pairs):
                    raise UsageError(f"--pairs {token}: there are {len(pairs)} pairs, numbered 0-{len(pairs) - 1}")
            else:
                indices = [p.index for p in pairs if token in (p.img_name, Path(p.img_name).stem)]
                if not indices:
                    raise UsageError(f"--pairs {token}: no pair has that image (give indices or image names)")
            wanted.update(dict.fromkeys(indices))
        chosen = [pairs[i] for i in sorted(wanted)]
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be >= 1, got {limit}")
        chosen = chosen[:limit]
    if not chosen:
        raise UsageError("no pairs selected")
    return chosen


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One job's parameters for a method: overrides of its defaults (sweep parameters hold their whole tuple) and
    whether the source prompt is empty or the pair's caption. ``label`` names it in tables and plots."""

    label: str
    overrides: tuple[tuple[str, Any], ...] = ()
    source: str = "none"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def slug(self) -> str:
        return slugify(self.label, 80)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "overrides": {k: _jsonable(v) for k, v in self.overrides}, "source": self.source}


@dataclass(frozen=True)
class Preset:
    """A ready-made run for one of the paper's ablations (Sec. 5.4). ``axis``: the per-edit parameter whose value
    is the ablation's setting (None: the job's setting label is)."""

    name: str
    method: str
    title: str
    summary: str
    settings: tuple[Setting, ...]
    axis: str | None = None

    def setting_of(self, row: Mapping[str, Any]) -> str:
        """The ablation setting an edit belongs to (``NTI-src``, ``inject 20%``)."""
        if self.axis is None:
            return str(row["setting"])
        return _axis_label(self.axis, row["params"][self.axis])

    def order(self) -> list[str]:
        """The settings in the order the paper lists them."""
        if self.axis is None:
            return [s.label for s in self.settings]
        return [_axis_label(self.axis, v) for s in self.settings for v in s.params[self.axis]]


def _axis_label(axis: str, value: Any) -> str:
    return f"inject {value * 100:g}%" if axis == "inject" else f"{axis}={_format_value(value)}"


INJECT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
PRESETS: dict[str, Preset] = {
    "inversion": Preset(
        "inversion", "ours", "inversion type",
        "inversion type: DDIM (guidance 1), NTI with the source prompt, NTI without (the default); injection 20%, "
        "every eta",
        (Setting("DDIM", (("inversion", "ddim"),), "none"), Setting("NTI-src", (("inversion", "nti"),), "pair"),
         Setting("NTI-w/o-src", (("inversion", "nti"),), "none")),
    ),
    "injection": Preset(
        "injection", "ours", "source text injection ratio",
        "source text injection ratio 0, 10, 20, 30, 40, 50% (one job per pair: the ratios share stages A and B); NTI "
        "without source, every eta",
        (Setting("injection", (("inject", INJECT_RATIOS),), "none"),),
        axis="inject",
    ),
}


def parse_key_values(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """``["eta=0,0.1", "opt_steps=100"]`` -> ``[("eta", "0,0.1"), ("opt_steps", "100")]``, in order."""
    result = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not value.strip():
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        result.append((name, value.strip()))
    names = [n for n, _ in result]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"{flag} {name} is given twice")
    return result


def param_for(info: MethodInfo, key: str) -> Param | None:
    """The parameter ``key`` names for this method: its name, its sweep label (``eta`` for ``etas``), either
    qualified by the method (``ours.eta``); None when it does not apply to this method."""
    method, dot, name = key.rpartition(".")
    if dot and method.replace("_", "-") != info.name:
        return None
    for p in info.params:
        if name in (p.name, p.label):
            return p
    return None


def plan_settings(
    methods: Sequence[str],
    sweeps: Sequence[str] = (),
    sets: Sequence[str] = (),
    preset: str | None = None,
) -> dict[str, tuple[Setting, ...]]:
    """Every method's settings from ``--sweep``/``--set`` (and a preset's), each validated against its table.

    A key applies to every method that has that parameter. Sweeping a method's sweep parameter (``eta``) stays
    inside one job; sweeping any other parameter (``opt_steps=100,200``) multiplies the jobs. ``source=none,pair``
    chooses the source prompt (empty, or the pair's caption).
    """
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    methods = list(dict.fromkeys(methods)) or ["ours"]
    infos = [method_info(m) for m in methods]
    swept, fixed = parse_key_values(sweeps, "--sweep"), parse_key_values(sets, "--set")
    for key in {k for k, _ in swept} & {k for k, _ in fixed}:
        raise UsageError(f"{key} is given to both --sweep and --set; give it once")
    for flag, items in (("--sweep", swept), ("--set", fixed)):
        for key, _ in items:
            if key != SOURCE_KEY and not any(param_for(info, key) for info in infos):
                raise UsageError(f"{flag} {key}: no parameter of that name in {', '.join(methods)}; "
                                 f"`nonrigid methods {' '.join(methods)}` lists them")
    return {info.name: _method_settings(info, swept, fixed, PRESETS[preset] if preset else None) for info in infos}


def _method_settings(info: MethodInfo, swept: list[tuple[str, str]], fixed: list[tuple[str, str]],
                     preset: Preset | None) -> tuple[Setting, ...]:
    common: dict[str, Any] = {}
    axes: list[tuple[str, list[Any]]] = []  # (parameter or "source", values): one job per combination
    for key, text in fixed:
        if key == SOURCE_KEY:
            axes.append((SOURCE_KEY, [_source_mode(text)]))
        elif (p := param_for(info, key)) is not None:
            common[p.name] = p.check(p.parse(text))
    for key, text in swept:
        if key == SOURCE_KEY:
            axes.append((SOURCE_KEY, list(dict.fromkeys(_source_mode(v) for v in text.split(",")))))
        elif (p := param_for(info, key)) is not None and p.is_sweep:
            common[p.name] = p.check(p.parse(text))
        elif p is not None:
            values = [p.check(p.parse(v)) for v in text.split(",")]
            axes.append((p.name, list(dict.fromkeys(values))))
    base = preset.settings if preset is not None else (Setting("default"),)
    if preset is not None:
        clash = {k for s in preset.settings for k, _ in s.overrides} & (set(common) | {k for k, _ in axes})
        clash |= {SOURCE_KEY} & {k for k, _ in axes}
        if clash:
            raise UsageError(f"the {preset.name} preset sets {', '.join(sorted(clash))} itself; leave it out")
    settings = []
    for start in base:
        for combo in itertools.product(*(values for _, values in axes)):
            overrides = {**common, **start.params}
            source = start.source
            parts = [] if start.label == "default" else [start.label]
            for (name, _), value in zip(axes, combo, strict=True):
                if name == SOURCE_KEY:
                    source = value
                else:
                    overrides[name] = value
                if len(dict(axes)[name]) > 1:
                    parts.append(f"{name}={_format_value(value)}")
            resolve_params(info, overrides)  # every value checked now, before any model loads
            settings.append(Setting(" ".join(parts) or "default", tuple(overrides.items()), source))
    slugs = [s.slug for s in settings]
    if len(set(slugs)) < len(slugs):
        raise UsageError(f"{info.name}: two settings would share a folder name ({', '.join(s.label for s in settings)}"
                         "); give values that differ in more than punctuation")
    return tuple(settings)


def _source_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in SOURCE_MODES:
        raise UsageError(f"source must be one of {', '.join(SOURCE_MODES)} (empty source prompt, or the pair's "
                         f"caption), got {text!r}")
    return mode


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One ``run_method`` call: a pair, a method, a setting, every seed (the first only if the method ignores it)."""

    pair: Pair
    method: str
    setting: Setting
    seeds: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.pair.index:03d}/{self.method}/{self.setting.slug}"

    @property
    def folder(self) -> str:
        return f"images/{self.method}/{self.setting.slug}/{self.pair.slug}"

    @property
    def source_prompt(self) -> str:
        return self.pair.source_text if self.setting.source == "pair" else ""


@dataclass
class BenchSpec:
    """Everything a benchmark run computes. ``identity()`` is what run.json keeps: a rerun must match it."""

    data: Path
    pairs: list[Pair]
    settings: dict[str, tuple[Setting, ...]]
    seeds: tuple[int, ...] = (0,)
    model: str = DEFAULT_MODEL
    size: int = 512
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype, batch_size, low_memory, compile
    metrics: dict[str, Any] = field(default_factory=dict)  # kind and weights of the metrics' networks
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise UsageError(f"--size must be positive, got {self.size}")
        if not self.seeds:
            raise UsageError("give at least one seed (--seeds N runs seeds 0..N-1)")
        batch = self.runtime.get("batch_size")
        if batch is not None and batch < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch}")

    def jobs(self) -> list[Job]:
        """Pair by pair (methods that share a pair's stages run back to back), then method, then setting."""
        return [
            Job(pair, method, setting, self.seeds if METHODS[method].seeded else self.seeds[:1])
            for pair in self.pairs for method, settings in self.settings.items() for setting in settings
        ]

    def identity(self) -> dict[str, Any]:
        uses_source = uses_source_captions(self.settings)
        return {
            "kind": "bench",
            "data": str(Path(self.data).resolve()),
            "pairs": [[p.index, p.img_name, p.target_text, *([p.source_text] if uses_source else [])]
                      for p in self.pairs],
            "methods": {m: [s.to_json() for s in settings] for m, settings in self.settings.items()},
            "seeds": list(self.seeds),
            "model": self.model,
            "size": self.size,
            "runtime": dict(self.runtime),
            "metrics": dict(self.metrics),
            "preset": self.preset,
        }


# --------------------------------------------------------------------------------------------------- run folder


class RunCache:
    """The run's stage cache (``run/cache``) as the methods see it (``load``/``save`` of a StageCache), showing
    only entries that finished jobs wrote or the current job wrote itself.

    An entry a killed job left behind is ignored (and rewritten), so the job's rerun computes exactly what a clean
    run computes: e.g. stage A of two seeds is one batch, which is not bit-identical to seed 1 alone.
    """

    def __init__(self, root: Path, committed: set[tuple[str, str]]):
        self.root = root
        self.committed = committed
        self.pending: set[tuple[str, str]] = set()
        self._store = None

    @property
    def store(self):
        """The StageCache underneath, made on first use (it imports torch; a finished run never needs it)."""
        if self._store is None:
            from .cache import StageCache

            self._store = StageCache(self.root)
        return self._store

    def path(self, stage: str, key: str) -> Path:
        return self.store.path(stage, key)

    def load(self, stage: str, key: str, device: Any = "cpu"):
        if (stage, key) not in self.committed and (stage, key) not in self.pending:
            return None
        return self.store.load(stage, key, device)

    def save(self, stage: str, key: str, tensors: dict, meta: dict) -> Path:
        path = self.store.save(stage, key, tensors, meta)
        self.pending.add((stage, key))
        return path


class RunFolder:
    """A run folder opened for writing: its database, its cache, and a lock that keeps a second process out."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock: Any):
        self.path = path
        self.db = db
        self._lock = lock
        committed = {(s, k) for s, k in db.execute("SELECT stage, key FROM stage_entries")}
        self.cache = RunCache(path / "cache", committed)

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict[str, Any], command: Sequence[str] = ()) -> RunFolder:
        """Create the run folder, or reopen it if ``identity`` is what it was made with; refuse anything else."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UsageError(f"{path} is a file; give a folder for --out")
        config = path / CONFIG_FILE
        if config.is_file():
            check_identity(path, identity)
        elif path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()):
            raise UsageError(f"{path} is not empty and holds no {CONFIG_FILE}; choose a new folder for --out")
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        if not config.is_file():
            document = {"format": FORMAT_VERSION, "config": identity, "command": list(command)}
            from .cache import write_atomic

            write_atomic(config, (json.dumps(document, indent=2) + "\n").encode())
            config.chmod(_file_mode())
        db = connect(path / DATABASE_FILE)
        db.executescript(SCHEMA)
        _remove_partial_files(path)
        return cls(path, db, lock)

    def done_jobs(self) -> set[str]:
        return {key for (key,) in self.db.execute("SELECT job FROM jobs")}

    def set_meta(self, **values: Any) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, json.dumps(_jsonable(v))) for k, v in values.items()])

    def write_image(self, relative: str, image: Image.Image) -> None:
        """A PNG written atomically: the file is whole or absent, never half-written."""
        from .cache import write_atomic

        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
        path.chmod(_file_mode())  # the temporary file was private; the image is as readable as any other file

    def commit(self, finished: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]]) -> None:
        """Jobs' rows and ``jobs`` entries (and the stage entries they wrote) in one transaction."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        pending = sorted(self.cache.pending)
        with self.db:
            for job_row, rows in finished:
                self.db.execute(
                    "INSERT INTO jobs VALUES (:job, :pair, :method, :setting, :params, :edits, :seconds, :timings, "
                    ":cache, :record, :finished_at)", {**_encode(job_row), "finished_at": now},
                )
                for row in rows:
                    row = {**_encode(row), "created_at": now}
                    columns = ", ".join(row)
                    self.db.execute(f"INSERT INTO edits ({columns}) VALUES ({', '.join(':' + c for c in row)})", row)
            job = finished[-1][0]["job"] if finished else ""
            self.db.executemany("INSERT OR REPLACE INTO stage_entries VALUES (?, ?, ?)",
                                [(stage, key, job) for stage, key in pending])
        self.cache.committed.update(pending)
        self.cache.pending.clear()

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()


def check_identity(path: Path, identity: dict[str, Any]) -> None:
    """Refuse to continue a run folder with a command that computes something else, naming what differs."""
    try:
        stored = json.loads((path / CONFIG_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"{path / CONFIG_FILE} is unreadable; choose a new folder for --out") from None
    current = json.loads(json.dumps(identity))
    if stored != current:
        keys = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise UsageError(f"{path} holds a run of a different command (it differs in: {', '.join(keys)}); rerun the "
                         "original command to resume it, or choose a new --out")


def _lock(path: Path) -> Any:
    """An exclusive lock on the run folder, released by the OS even on SIGKILL (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    handle = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"{path} is in use by another nonrigid process; wait for it or choose another --out") \
            from None
    return handle


def _remove_partial_files(path: Path) -> None:
    """Temporary files of writes a killed run left behind (we hold the lock: nobody else is writing)."""
    for folder in ("images", "inputs", "cache"):
        for tmp in (path / folder).rglob(".*.tmp") if (path / folder).is_dir() else ():
            tmp.unlink(missing_ok=True)


@functools.cache
def _file_mode() -> int:
    """rw for everyone the umask allows: what a plain ``open(..., "w")`` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60)
    db.execute("PRAGMA synchronous=FULL")
    return db


def reader(path: Path) -> sqlite3.Connection:
    """A connection for reading an existing database. Not ``mode=ro``: after a kill mid-commit the first reader
    must roll the leftover journal back, which a read-only connection cannot (sqlite opens read-only files
    read-only by itself)."""
    return sqlite3.connect(path, timeout=60)


def _encode(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(_jsonable(v)) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}


def read_rows(run: str | os.PathLike) -> list[dict[str, Any]]:
    """Every row of a run's ``edits`` table in insertion order, JSON columns decoded."""
    path = Path(run) / DATABASE_FILE
    if not path.is_file():
        raise UsageError(f"{run} holds no {DATABASE_FILE}; give a folder written by `nonrigid bench` or "
                         "`nonrigid score`")
    db = reader(path)
    db.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in db.execute("SELECT * FROM edits ORDER BY id")]
    finally:
        db.close()
    for row in rows:
        for column in JSON_COLUMNS:
            if row.get(column) is not None:
                row[column] = json.loads(row[column])
    return rows


def done_job_keys(run: str | os.PathLike) -> set[str]:
    """The finished jobs of a run folder (none if it holds no database yet), without locking it."""
    path = Path(run) / DATABASE_FILE
    if not path.is_file():
        return set()
    db = reader(path)
    try:
        return {key for (key,) in db.execute("SELECT job FROM jobs")}
    except sqlite3.DatabaseError:  # created but its tables not yet
        return set()
    finally:
        db.close()


def read_config(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / CONFIG_FILE
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"{run} holds no readable {CONFIG_FILE}; give a folder written by `nonrigid bench` or "
                         "`nonrigid score`") from None


# --------------------------------------------------------------------------------------------------- running


def load_metrics(kind: str = "default", *, clip_model: str | None = None, lpips_weights: str | None = None,
                 vgg_weights: str | None = None, aesthetic_head: str | None = None, device: Any = None):
    """The metrics of the evaluation protocol, every network loaded now (a missing weight file fails before the
    first edit, not after it); ``kind="tiny"``: small random backbones, for tests only."""
    from .metrics import Metrics

    if kind == "tiny":
        return Metrics.tiny(seed=0)
    options = {"lpips_weights": lpips_weights, "vgg_weights": vgg_weights, "aesthetic_head": aesthetic_head,
               "device": device}
    return Metrics(clip_model, **options).load() if clip_model else Metrics(**options).load()


@dataclass
class BenchStats:
    jobs: int = 0
    done_before: int = 0
    ran: int = 0
    edits: int = 0


def expected_edits(job: Job) -> int:
    """Edits a job makes: seeds x every value of the method's sweep parameters (ours may merge injection ratios
    that round to the same step count)."""
    params = resolve_params(METHODS[job.method], job.setting.params)
    count = len(job.seeds)
    for p in METHODS[job.method].sweeps:
        count *= len(params[p.name])
    return count


def pending_jobs(spec: BenchSpec, run: RunFolder) -> list[Job]:
    done = run.done_jobs()
    return [job for job in spec.jobs() if job.key not in done]


def run_benchmark(
    spec: BenchSpec,
    run: RunFolder,
    pipe: Any,
    metrics: Any,
    *,
    progress: bool = False,
) -> BenchStats:
    """Run every job of ``spec`` that ``run`` does not hold yet, committing each when its images are on disk."""
    from tqdm.auto import tqdm

    jobs = spec.jobs()
    todo = pending_jobs(spec, run)
    stats = BenchStats(jobs=len(jobs), done_before=len(jobs) - len(todo))
    bar = tqdm(total=len(jobs), initial=stats.done_before, desc="bench", unit="job", disable=not progress)
    with bar:
        for job in todo:
            bar.set_postfix_str(f"{job.pair.slug} {job.method} {job.setting.label}"[:60])
            stats.edits += run_job(job, spec, run, pipe, metrics)
            stats.ran += 1
            bar.update(1)
    return stats


def run_job(job: Job, spec: BenchSpec, run: RunFolder, pipe: Any, metrics: Any) -> int:
    """Edit, save the images, score them, commit the rows; returns the number of edits."""
    from .methods.run import run_method
    from .output import variant_filename

    run.cache.pending.clear()  # stage entries of a job that failed before this one in this process do not count
    result = run_method(
        pipe, job.pair.image, job.pair.target_text, job.method, job.setting.params, seeds=job.seeds,
        source_prompt=job.source_prompt, size=spec.size, cache=run.cache,
        batch_size=spec.runtime.get("batch_size"),
    )
    input_path = f"inputs/{job.pair.slug}.png"
    run.write_image(input_path, result.input_image)
    paths = [f"{job.folder}/{variant_filename(v.seed, v.knobs)}" for v in result.variants]
    if len(set(paths)) != len(paths):
        raise UsageError(f"{job.method}: two variants of one job got the same file name; give distinct sweep values")
    for path, variant in zip(paths, result.variants, strict=True):
        run.write_image(path, variant.image)
    tick = time.perf_counter()
    count = len(result.variants)
    scores = metrics.score_batch([result.input_image] * count, [v.image for v in result.variants],
                                 [job.pair.target_text] * count)
    timings = {**result.timings, "scoring": time.perf_counter() - tick}
    total = result.timings["total"]
    info = METHODS[job.method]
    rows = []
    for path, variant, score in zip(paths, result.variants, scores, strict=True):
        rows.append({
            "job": job.key, "pair": job.pair.index, "image_name": job.pair.img_name,
            "target_text": job.pair.target_text, "source_prompt": job.source_prompt, "method": job.method,
            "setting": job.setting.label, "seed": variant.seed, "knobs": variant.knobs,
            "params": edit_params(info, result.params, variant), **{m: score.get(m) for m in METRIC_NAMES},
            "image": path, "record": {**variant.record, "input": input_path},
            "job_seconds": total, "seconds_per_edit": total / count, "timings": timings, "cache": result.cache,
        })
    job_row = {"job": job.key, "pair": job.pair.index, "method": job.method, "setting": job.setting.label,
               "params": result.params, "edits": count, "seconds": total, "timings": timings,
               "cache": result.cache, "record": result.record}
    run.commit([(job_row, rows)])
    return count


def edit_params(info: MethodInfo, params: Mapping[str, Any], variant: Any) -> dict[str, Any]:
    """The job's parameters with each sweep parameter replaced by this edit's own value.

    The value is the variant's record under the parameter's name (or ``<name>_ratio``, as ours records the
    injection ratio whose label ``K`` counts steps), else its knob.
    """
    values = dict(params)
    for p in info.sweeps:
        for source in (variant.record.get(p.name), variant.record.get(f"{p.name}_ratio"), variant.knobs.get(p.label)):
            if source is not None:
                values[p.name] = source
                break
    return values


# --------------------------------------------------------------------------------------------------- outside edits


def normalize_words(text: str) -> str:
    """Lower-case alphanumeric words separated by single spaces: how file names and texts are compared."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@dataclass(frozen=True)
class OutsideEdit:
    """An edit made elsewhere, matched to its pair; ``seed`` from a trailing number, when the name has one."""

    file: Path
    pair: Pair
    seed: int = 0


def match_edits(files: Sequence[Path], pairs: Sequence[Pair]) -> tuple[list[OutsideEdit], list[str]]:
    """Match ``<image name>-<target text>[ <n>].png`` files to pairs, ignoring case, spaces, underscores and
    punctuation, with or without the image's extension. Returns the matches and one warning per file left out."""
    exact: dict[str, list[Pair]] = {}
    loose: dict[str, list[Pair]] = {}
    for pair in pairs:
        target = normalize_words(pair.target_text)
        exact.setdefault(f"{normalize_words(pair.img_name)} {target}", []).append(pair)
        loose.setdefault(f"{normalize_words(Path(pair.img_name).stem)} {target}", []).append(pair)
    matches: dict[tuple[int, int], OutsideEdit] = {}
    warnings: list[str] = []
    for file in sorted(files):
        name = normalize_words(file.stem)
        candidates, seed = exact.get(name) or loose.get(name) or [], 0
        numbered = re.fullmatch(r"(.*) (\d+)", name)
        if not candidates and numbered:  # several edits of one pair: "<image>-<text>_3.png"
            candidates, seed = exact.get(numbered[1]) or loose.get(numbered[1]) or [], int(numbered[2])
        if not candidates:
            warnings.append(f"{file.name}: matches no pair of input_list.json; skipped")
        elif len(candidates) > 1:
            names = ", ".join(str(p.index) for p in candidates)
            warnings.append(f"{file.name}: matches several pairs ({names}); skipped")
        elif (candidates[0].index, seed) in matches:
            other = matches[candidates[0].index, seed].file.name
            warnings.append(f"{file.name}: pair {candidates[0].index} seed {seed} is already {other}; skipped")
        else:
            matches[candidates[0].index, seed] = OutsideEdit(file, candidates[0], seed)
    return [matches[k] for k in sorted(matches)], warnings


def outside_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of edited images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def score_identity(folder: Path, data: Path, method: str, size: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "score", "folder": str(folder.resolve()), "data": str(data.resolve()), "method": method,
            "size": size, "metrics": dict(metrics)}


def score_folder(
    edits: Sequence[OutsideEdit],
    run: RunFolder,
    method: str,
    size: int,
    metrics: Any,
    *,
    progress: bool = False,
) -> BenchStats:
    """Score outside edits against their pair's original (both as the editor sees images: center crop, ``size``),
    copying each into the run folder; resumable like the benchmark (one job per file)."""
    from tqdm.auto import tqdm

    from .images import load_image

    done = run.done_jobs()
    todo = [e for e in edits if _outside_key(e, method) not in done]
    stats = BenchStats(jobs=len(edits), done_before=len(edits) - len(todo))
    with tqdm(total=len(edits), initial=stats.done_before, desc="score", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), SCORE_BATCH):
            chunk = todo[start:start + SCORE_BATCH]
            sources = [load_image(e.pair.image, size) for e in chunk]
            edited = [load_image(e.file, size) for e in chunk]
            finished = []
            scores = metrics.score_batch(sources, edited, [e.pair.target_text for e in chunk])
            for edit, source, image, score in zip(chunk, sources, edited, scores, strict=True):
                input_path = f"inputs/{edit.pair.slug}.png"
                path = f"images/{slugify(method)}/default/{edit.pair.slug}/seed{edit.seed}.png"
                run.write_image(input_path, source)
                run.write_image(path, image)
                key = _outside_key(edit, method)
                row = {"job": key, "pair": edit.pair.index, "image_name": edit.pair.img_name,
                       "target_text": edit.pair.target_text, "source_prompt": "", "method": method,
                       "setting": "default", "seed": edit.seed, "knobs": {}, "params": {},
                       **{m: score.get(m) for m in METRIC_NAMES}, "image": path,
                       "record": {"file": edit.file.name, "input": input_path}}
                job_row = {"job": key, "pair": edit.pair.index, "method": method, "setting": "default", "params": {},
                           "edits": 1, "seconds": None, "timings": None, "cache": None,
                           "record": {"file": edit.file.name}}
                finished.append((job_row, [row]))
            run.commit(finished)
            stats.ran += len(chunk)
            stats.edits += len(chunk)
            bar.update(len(chunk))
    return stats


def _outside_key(edit: OutsideEdit, method: str) -> str:
    return f"{edit.pair.index:03d}/{method}/seed{edit.seed}"


@contextlib.contextmanager
def opened(path: str | os.PathLike, identity: dict[str, Any], command: Sequence[str] = ()) -> Iterator[RunFolder]:
    """:meth:`RunFolder.open` as a context manager that closes the database and releases the lock."""
    run = RunFolder.open(path, identity, command)
    try:
        yield run
    finally:
        run.close()
