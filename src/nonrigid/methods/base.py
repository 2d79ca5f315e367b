"""What every editing method shares: its parameter table, its result, and the context it runs in.

Torch-free, so that ``nonrigid methods`` and usage errors answer at once. A method is a module with an ``INFO``
(:class:`MethodInfo`: name, summary and :class:`Param` table) and a function

    run(pipe, picture, target_prompt, params, ctx) -> MethodOutput

where ``params`` holds every parameter of the table, resolved and validated (:func:`resolve_params`), and ``ctx``
the inputs every method shares (:class:`MethodContext`). Sweep parameters hold tuples: one variant per value, and
the last sweep parameter is the grid's column axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..progress import Progress

KINDS = ("int", "float", "str", "bool", "ints", "floats")


@dataclass(frozen=True)
class Param:
    """One knob of a method.

    ``kind`` is one of :data:`KINDS`; "ints"/"floats" are sweeps (comma-separated on the command line, one
    variant per value). ``label`` names a sweep value in file names and grid labels (``eta0.20``); ``low``/``high``
    bound every value; ``choices`` restricts a str; ``optional`` allows "none" (the method picks).
    """

    name: str
    kind: str
    default: Any
    help: str
    label: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    open_low: bool = False  # values must be above ``low``, not just at least ``low``
    per_steps: float | None = None  # the default counts steps out of this many: it scales with num_steps

    @property
    def is_sweep(self) -> bool:
        return self.kind in ("ints", "floats")

    def parse(self, text: str) -> Any:
        """A command-line value (``"0.1,0.2"``, ``"true"``, ``"none"``) as this parameter's type."""
        text = text.strip()
        if self.optional and text.lower() in ("none", ""):
            return None
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "bool":
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes")
            if self.kind == "ints":
                return tuple(int(v) for v in text.split(",") if v.strip())
            if self.kind == "floats":
                return tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise UsageError(f"{self.name} expects {self.describe_kind()}, got {text!r}") from None
        return text

    def describe_kind(self) -> str:
        return {
            "int": "an integer", "float": "a number", "str": "a word", "bool": "true or false",
            "ints": "comma-separated integers", "floats": "comma-separated numbers",
        }[self.kind]

    def check(self, value: Any, shown_as: str = "") -> Any:
        """Normalise and validate ``value``; raise :class:`UsageError` with a message that says what is allowed.

        ``shown_as`` names the value in messages (e.g. the flag ``--eta`` that set ``etas``)."""
        try:
            return self._check(value)
        except UsageError as err:
            if shown_as:
                raise UsageError(str(err).replace(self.name, shown_as, 1)) from None
            raise

    def _check(self, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise UsageError(f"{self.name} needs a value")
        if self.is_sweep:
            values = (value,) if isinstance(value, (int, float)) else tuple(value)
            if not values:
                raise UsageError(f"{self.name} needs at least one value")
            cast = int if self.kind == "ints" else float
            values = tuple(dict.fromkeys(cast(v) for v in values))
            for v in values:
                self._check_bounds(v)
            return values
        if self.kind == "int":
            value = int(value)
        elif self.kind == "float":
            value = float(value)
        elif self.kind == "bool":
            value = bool(value)
        else:
            value = str(value)
            if self.choices and value not in self.choices:
                raise UsageError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        self._check_bounds(value)
        return value

    def _check_bounds(self, value: float) -> None:
        if self.low is not None and self.open_low and value <= self.low:
            raise UsageError(f"{self.name} must be > {self.low:g}, got {value:g}")
        if self.low is not None and value < self.low:
            raise UsageError(f"{self.name} must be >= {self.low:g}, got {value:g}")
        if self.high is not None and value > self.high:
            raise UsageError(f"{self.name} must be <= {self.high:g}, got {value:g}")


@dataclass(frozen=True)
class MethodInfo:
    """A method's name, what it does, whether its result depends on the seed, and its parameters."""

    name: str
    summary: str
    params: tuple[Param, ...]
    seeded: bool = True
    reference: str = ""
    memory: str = ""
    # model families (``ModelFamily.name``) the method applies to, None for every family; ``why_not`` says why
    # the others are refused
    families: tuple[str, ...] | None = None
    why_not: str = ""
    # the reference's own settings for a model family (``ModelFamily.name`` -> parameter values), used where the
    # caller leaves a parameter unset: FlowEdit's authors tuned FLUX apart from SD3. A step-counting value
    # (``Param.per_steps``) counts out of that family's ``num_steps`` and scales with the steps actually run.
    family_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def check_family(self, family) -> None:
        """Refuse, in one line with the reason, a model family this method cannot run on."""
        if self.families is not None and family.name not in self.families:
            raise UsageError(f"method {self.name!r} does not apply to this model ({family.describe()}): "
                             f"{self.why_not or 'it supports ' + ', '.join(self.families)}")

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params)
        raise UsageError(f"method {self.name!r} has no parameter {name!r} (its parameters: {known})")

    @property
    def sweeps(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.is_sweep)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


def resolve_params(
    info: MethodInfo, overrides: Mapping[str, Any] | None = None, shown_as: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Defaults updated by ``overrides`` (values or command-line strings), every value checked.

    ``shown_as`` maps parameter names to what the user typed (``{"etas": "--eta"}``) for error messages. A default
    that counts steps (``Param.per_steps``) follows ``num_steps``: Edit-friendly's skips (24, 36, 48) of the
    reference's 100 steps become (5, 7, 10) at 20 steps."""
    params = info.defaults()
    for name, value in (overrides or {}).items():
        param = info.param(name)
        params[name] = param.parse(value) if isinstance(value, str) and param.kind != "str" else value
    for p in info.params:
        if p.per_steps is not None and p.name not in (overrides or {}) and "num_steps" in params:
            steps = int(params["num_steps"])
            params[p.name] = tuple(dict.fromkeys(round(v * steps / p.per_steps) for v in p.default))
    shown_as = shown_as or {}
    return {p.name: p.check(params[p.name], shown_as.get(p.name, "")) for p in info.params}


@dataclass
class MethodVariant:
    """One edited image: the seed and the sweep values that made it, plus anything worth recording.

    ``knobs`` name the sweep values by label, as file names and grids show them (``K``: injection steps);
    ``params`` by parameter name, as the table gives them (``inject``: the ratio). A method fills ``params`` where
    a label's value is not the parameter's own (:func:`~nonrigid.methods.run.run_method` fills in the rest).
    """

    seed: int
    knobs: dict[str, int | float]
    image: Image.Image
    record: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    """Inputs every method shares. ``cache_fields`` identify model, image, dtype and device in stage cache keys."""

    seeds: tuple[int, ...] = (0,)
    source_prompt: str = ""
    cache: Any = None
    cache_fields: dict[str, str] = field(default_factory=dict)
    progress: Progress = False
    batch_size: int | None = None


@dataclass
class MethodOutput:
    """What a method's ``run`` returns: the variants (grid order), stage timings, cache hits and extras.

    ``chosen`` holds the values a method picked for parameters left to it (``none``: "the method picks"), which
    the result then records as the parameters' values."""

    variants: list[MethodVariant]
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    stages: Any = None  # what later variants can be sampled from without the earlier stages (ours: EditStages)


@dataclass
class MethodResult:
    """A finished edit of any method, ready for :func:`nonrigid.output.save_result`."""

    method: str
    input_image: Image.Image
    target_prompt: str
    source_prompt: str
    seeds: tuple[int, ...]
    params: dict[str, Any]
    variants: list[MethodVariant]
    knob_labels: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    stages: Any = None  # the method's reusable stage results (ours: EditStages), kept in memory by the web UI
