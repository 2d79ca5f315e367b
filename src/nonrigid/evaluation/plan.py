"""What a benchmark run computes: every method's settings (from sweeps, fixed values and presets), the jobs they
make, and :class:`BenchSpec`, whose ``identity()`` a run folder keeps. Torch-free.

A *job* is one :func:`~nonrigid.methods.run.run_method` call: one pair, one method, one *setting* (a value of
every swept non-sweep parameter, e.g. ``opt_steps=100``), all seeds and all values of the method's own sweep
parameters at once (ours shares stages A and B across every eta and injection ratio).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..methods.base import MethodInfo, Param, check_overrides, parse_key_values, resolve_params
from ..methods.catalogue import INJECT_ABLATION, METHODS, method_info
from ..methods.output import slugify
from ..models import DEFAULT_MODEL
from .data import Pair
from .runfolder import jsonable

SOURCE_MODES = ("none", "pair")  # source prompt of a job: empty (the paper's default) or the pair's caption
SOURCE_KEY = "source"


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
        return {"label": self.label, "overrides": {k: jsonable(v) for k, v in self.overrides}, "source": self.source}


@dataclass(frozen=True)
class Preset:
    """A ready-made run for one of the paper's ablations (Sec. 5.4). ``axis``: the per-edit parameter whose value
    is the ablation's setting (None: the job's setting label is); ``axis_format`` names one of its values
    (``{value}`` as given, ``{percent}`` times 100)."""

    name: str
    method: str
    title: str
    summary: str
    settings: tuple[Setting, ...]
    axis: str | None = None
    axis_format: str = "{axis}={value}"

    def setting_of(self, row: Mapping[str, Any]) -> str:
        """The ablation setting an edit belongs to (``NTI-src``, ``inject 20%``)."""
        if self.axis is None:
            return str(row["setting"])
        return self.axis_label(row["params"][self.axis])

    def axis_label(self, value: Any) -> str:
        return self.axis_format.format(axis=self.axis, value=format_value(value),
                                       percent=f"{value * 100:g}" if isinstance(value, int | float) else value)

    def order(self) -> list[str]:
        """The settings in the order the paper lists them."""
        if self.axis is None:
            return [s.label for s in self.settings]
        return [self.axis_label(v) for s in self.settings for v in s.params[self.axis]]


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
        (Setting("injection", (("inject", INJECT_ABLATION),), "none"),),
        axis="inject", axis_format="inject {percent}%",
    ),
}


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
    fast: bool = False,
) -> dict[str, tuple[Setting, ...]]:
    """Every method's settings from ``KEY=V1,V2`` sweeps and ``KEY=VALUE`` fixed values (the texts of ``--sweep``
    and ``--set``, which its messages name them by) and a preset's, each validated against its table. ``fast``:
    the methods that have a fast preset (ours) take its values where ``--set`` and ``--sweep`` leave them.

    A key applies to every method that has that parameter. Sweeping a method's sweep parameter (``eta``) stays
    inside one job; sweeping any other parameter (``opt_steps=100,200``) multiplies the jobs. ``source=none,pair``
    chooses the source prompt (empty, or the pair's caption). No methods: the first of the catalogue.
    """
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    methods = list(dict.fromkeys(methods)) or [next(iter(METHODS))]
    infos = [method_info(m) for m in methods]
    swept, fixed = parse_key_values(sweeps, "--sweep"), parse_key_values(sets, "--set")
    for key in {k for k, _ in swept} & {k for k, _ in fixed}:
        raise UsageError(f"{key} is given to both --sweep and --set; give it once")
    for flag, items in (("--sweep", swept), ("--set", fixed)):
        for key, _ in items:
            if key != SOURCE_KEY and not any(param_for(info, key) for info in infos):
                raise UsageError(f"{flag} {key}: no parameter of that name in {', '.join(methods)}; "
                                 f"`nonrigid methods {' '.join(methods)}` lists them")
    if fast and not any("fast" in info.presets for info in infos):
        raise UsageError(f"fast is a preset of ours; {', '.join(methods)} has none")
    return {info.name: _method_settings(info, swept, _with_fast(info, fixed, swept) if fast else fixed,
                                        PRESETS[preset] if preset else None) for info in infos}


def _with_fast(info: MethodInfo, fixed: list[tuple[str, str]], swept: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``fixed`` with the method's fast preset under it (the user's keys win); unchanged for a method without one."""
    given = {p.name for key, _ in [*fixed, *swept] if (p := param_for(info, key)) is not None}
    values = info.presets.get("fast", {})
    return [*((name, format_value(value)) for name, value in values.items() if name not in given), *fixed]


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
                    parts.append(f"{name}={format_value(value)}")
            check_overrides(info, overrides)  # every value checked now, before any model loads
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


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    return str(value)


def uses_source_captions(settings: Mapping[str, Sequence[Setting]]) -> bool:
    return any(s.source == "pair" for method_settings in settings.values() for s in method_settings)


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


def expected_edits(job: Job) -> int:
    """Edits a job makes: seeds x every value of the method's sweep parameters (a method may merge values that
    amount to the same edit, e.g. injection ratios that round to the same step count)."""
    params = resolve_params(METHODS[job.method], job.setting.params)
    count = len(job.seeds)
    for p in METHODS[job.method].sweeps:
        count *= len(params[p.name])
    return count


@dataclass
class BenchSpec:
    """Everything a benchmark run computes. ``identity()`` is what run.json keeps: a rerun must match it."""

    data: Path
    pairs: list[Pair]
    settings: dict[str, tuple[Setting, ...]]
    seeds: tuple[int, ...] = (0,)
    model: str = DEFAULT_MODEL
    size: int | None = None  # None: the model's native size
    runtime: dict[str, Any] = field(default_factory=dict)  # device, dtype, batch_size, low_memory, compile
    metrics: dict[str, Any] = field(default_factory=dict)  # kind and weights of the metrics' networks
    preset: str | None = None
    dataset: str = "tedbench"  # the folder's layout: "tedbench" or "piebench"
    types: tuple[str, ...] = ()  # PIE-Bench: the editing types selected (ids)
    crop: str | None = "square"  # the benchmarks' protocol; None: each picture at its own aspect ratio
    masks: str | None = None  # None, "piebench" (its own masks) or a folder of <image stem>.png masks
    # each method's own model where it is not ``model`` (the instruction editors run on their own models)
    method_models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size is not None and self.size <= 0:
            raise UsageError(f"size must be positive, got {self.size}")
        if not self.seeds:
            raise UsageError("give at least one seed")
        batch = self.runtime.get("batch_size")
        if batch is not None and batch < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch}")
        if self.masks is not None:
            self._check_masks()

    def _check_masks(self) -> None:
        """Every pair has its mask, and every method takes one, before any job runs."""
        for method in self.settings:
            if not METHODS[method].masks:
                raise UsageError(f"masks: method {method!r} takes no mask ({METHODS[method].why_no_mask})")
        if self.masks == "piebench":
            missing = [p.img_name for p in self.pairs if p.mask is None]
            if missing:
                raise UsageError(f"masks piebench: {missing[0]} has no PIE-Bench mask (a TEdBench pair?)")
            return
        folder = Path(self.masks)
        if not folder.is_dir():
            raise UsageError(f"masks: {folder} is not a folder of masks (or piebench)")
        missing = [p.img_name for p in self.pairs if not (folder / f"{Path(p.img_name).stem}.png").is_file()]
        if missing:
            raise UsageError(f"masks: {folder} has no {Path(missing[0]).stem}.png (one mask per image, named like it)")

    def model_for(self, method: str) -> str:
        """The model ``method``'s jobs run on: its own (``method_models``), else the run's."""
        return self.method_models.get(method, self.model)

    def mask_of(self, pair: Pair):
        """A pair's mask as an edit request takes it (None without masks)."""
        if self.masks is None:
            return None
        if self.masks == "piebench":
            from .piebench import decode_mask

            return decode_mask(pair.mask, border=False)  # the reference's border rows count for scoring, not here
        return Path(self.masks) / f"{Path(pair.img_name).stem}.png"

    def jobs(self) -> list[Job]:
        """Pair by pair (methods that share a pair's stages run back to back), then method, then setting."""
        return [
            Job(pair, method, setting, self.seeds if METHODS[method].seeded else self.seeds[:1])
            for pair in self.pairs for method, settings in self.settings.items() for setting in settings
        ]

    def identity(self) -> dict[str, Any]:
        uses_source = uses_source_captions(self.settings)
        # the dataset's instructions only where a method follows them, so that other runs keep their identity
        uses_instructions = any(METHODS[m].instructions for m in self.settings)
        return {
            "kind": "bench",
            "data": str(Path(self.data).resolve()),
            "pairs": [[p.index, p.img_name, p.target_text, *([p.source_text] if uses_source else []),
                       *([p.instruction] if uses_instructions else [])] for p in self.pairs],
            "methods": {m: [s.to_json() for s in settings] for m, settings in self.settings.items()},
            "seeds": list(self.seeds),
            "model": self.model,
            "size": self.size,
            "runtime": dict(self.runtime),
            "metrics": dict(self.metrics),
            "preset": self.preset,
            # PIE-Bench runs only, so that TEdBench run folders written before PIE-Bench existed still resume
            **({"dataset": self.dataset, "types": list(self.types)} if self.dataset != "tedbench" else {}),
            # likewise only where not the protocol's square crop without masks
            **({"crop": self.crop} if self.crop != "square" else {}),
            **({"masks": str(Path(self.masks).resolve()) if self.masks != "piebench" else self.masks}
               if self.masks is not None else {}),
            **({"method_models": dict(self.method_models)} if self.method_models else {}),
        }
