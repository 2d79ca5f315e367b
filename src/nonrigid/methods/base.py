"""What every editing method shares: its parameter table, the one resolution of its parameters, its inputs and
its result.

Torch-free, so that ``nonrigid methods`` and usage errors answer at once. A method is a module with an ``INFO``
(:class:`MethodInfo`: name, summary, the :class:`Param` table, the model capabilities it needs) and a function
written once, for a batch of inputs:

    run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]

where ``ctx.params`` holds every parameter of the table, resolved once by :func:`resolve_params` (the method's
defaults, the model family's, the caller's values, all checked). Sweep parameters hold tuples: one variant per
value, and the last sweep parameter is the grid's column axis. The front door
(:func:`nonrigid.methods.run.run_edits`) prepares the inputs, resolves the parameters and calls ``run``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..models.capabilities import TEXT_CONDITIONING, describe
from ..progress import Progress
from ..stages import DEFAULT_GUIDANCE

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
    """A method's name, what it does, whether its result depends on the seed, its parameters, and what it needs of
    a model."""

    name: str
    summary: str
    params: tuple[Param, ...]
    seeded: bool = True
    reference: str = ""
    memory: str = ""
    # the model capabilities (:mod:`nonrigid.models.capabilities`) the method needs; a family lacking one is
    # refused in one line, with ``why_not`` (or the capability's description) as the reason
    requires: tuple[str, ...] = ()
    why_not: str = ""
    # the reference's own settings by the model's kind of guidance (``ModelFamily.guidance``), used where the
    # caller leaves a parameter unset: FlowEdit's authors tuned FLUX (distilled guidance) apart from SD3. A
    # step-counting value (``Param.per_steps``) counts out of those settings' ``num_steps`` and scales with the
    # steps actually run.
    settings_by_guidance: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # whether ``run`` edits several images as one model batch (the benchmark groups such jobs); the others get
    # one image per call
    batches_images: bool = False
    # named sets of parameter values (``fast``), applied under the caller's own values; each chosen by evidence
    # that the page says where it is (docs/MINIATURE.md)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # whether the method takes a mask of where the edit may change the picture (``why_no_mask``: why not)
    masks: bool = False
    why_no_mask: str = ""
    # whether the method takes an instruction ("make the dog jump") besides the target prompt (the instruction
    # editors); others ignore a request's instruction
    instructions: bool = False
    # a single-file checkpoint as this method's model: the one-line reason it needs a ``config`` to be read
    # (``file_needs_config``), or cannot be read at all (``why_no_single_file``); both empty: as any model
    file_needs_config: str = ""
    why_no_single_file: str = ""

    def preset(self, name: str | None) -> dict[str, Any]:
        """The values of preset ``name`` (none for None), or a one-line refusal naming the method's presets."""
        if name is None:
            return {}
        if name not in self.presets:
            offered = f"its presets: {', '.join(self.presets)}" if self.presets else "it has none"
            raise UsageError(f"method {self.name!r} has no preset {name!r} ({offered})")
        return dict(self.presets[name])

    def check_family(self, family, alternatives: Sequence[str] = ()) -> None:
        """Refuse, in one line with the reason, a model this method cannot run on. A model without a text-only
        conditioning (an instruction editor whose prompt encoder reads the image) is refused for that reason
        first, naming the methods that do run on it (``alternatives``)."""
        missing = [c for c in self.requires if c not in family.capabilities()]
        if TEXT_CONDITIONING in missing:
            others = f"; methods for this model: {', '.join(alternatives)}" if alternatives else ""
            raise UsageError(f"method {self.name!r} does not apply to this model ({family.describe()}): its stages "
                             "need a text-only conditioning of the prompt, and this model's prompt encoder reads "
                             f"the input image with the text{others}")
        if missing:
            raise UsageError(f"method {self.name!r} does not apply to this model ({family.describe()}): "
                             f"{self.why_not or 'it needs ' + describe(tuple(missing))}")

    def check_model_source(self, model: str | PathLike, config: str | None = None) -> None:
        """Refuse, before anything loads, a single-file checkpoint this method's model cannot be read from
        (Qwen-Image-Edit: none; FLUX.1 Kontext: not without a Kontext ``config``)."""
        if not Path(model).expanduser().is_file():
            return
        if self.why_no_single_file:
            raise UsageError(self.why_no_single_file)
        if self.file_needs_config and not config:
            raise UsageError(self.file_needs_config)

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


def parse_key_values(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    """``["eta=0,0.1", "opt_steps=100"]`` -> ``[("eta", "0,0.1"), ("opt_steps", "100")]``, in order; ``flag``
    names the items in error messages."""
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


def check_overrides(
    info: MethodInfo, overrides: Mapping[str, Any] | None = None, shown_as: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The caller's values (values or command-line strings) parsed and checked against the table, and nothing
    else: what the command line, the page and the benchmark plan validate before any model is loaded. The
    defaults are filled in once the model is known (:func:`resolve_params`)."""
    shown_as = shown_as or {}
    checked = {}
    for name, value in (overrides or {}).items():
        param = info.param(name)
        value = param.parse(value) if isinstance(value, str) and param.kind != "str" else value
        checked[name] = param.check(value, shown_as.get(name, ""))
    return checked


def resolve_params(
    info: MethodInfo, overrides: Mapping[str, Any] | None = None, family: Any = None,
    shown_as: Mapping[str, str] | None = None, preset: str | None = None,
) -> dict[str, Any]:
    """Every parameter of the method, resolved once: its defaults, then a ``preset``'s values, then the model
    family's where neither the caller nor the preset set a value (:func:`family_defaults`), then the caller's
    ``overrides`` (values or command-line strings), every value checked. A family distilled for a few steps keeps
    them under a preset.

    ``shown_as`` maps parameter names to what the user typed (``{"etas": "--eta"}``) for error messages. A default
    that counts steps (``Param.per_steps``) follows ``num_steps``: Edit-friendly's skips (24, 36, 48) of the
    reference's 100 steps become (5, 7, 10) at 20 steps."""
    chosen = info.preset(preset)
    if family is not None and family.default_steps is not None:
        chosen.pop("num_steps", None)  # a model distilled for few steps (FLUX schnell) keeps them under a preset
    overrides = {**chosen, **(overrides or {})}
    if family is not None:
        overrides = family_defaults(info, family, overrides)
    params = info.defaults()
    for name, value in overrides.items():
        param = info.param(name)
        params[name] = param.parse(value) if isinstance(value, str) and param.kind != "str" else value
    for p in info.params:
        if p.per_steps is not None and p.name not in overrides and "num_steps" in params:
            steps = int(params["num_steps"])
            params[p.name] = tuple(dict.fromkeys(round(v * steps / p.per_steps) for v in p.default))
    shown_as = shown_as or {}
    return {p.name: p.check(params[p.name], shown_as.get(p.name, "")) for p in info.params}


def family_defaults(info: MethodInfo, family: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the model family's settings where the caller left them unset.

    - The family's guidance scale where the method has a plain classifier-free guidance scale (not for ours with
      DDIM inversion on a model with classifier-free guidance, which samples at guidance 1).
    - On a family without an unconditional branch (FLUX), ours' inversion is the plain inversion (the stand-in for
      NTI there: inverting and sampling at the same distilled guidance walk one vector field both ways,
      docs/FAMILIES.md), and its guidance the family's distilled value.
    - A family made for another number of steps (FLUX schnell: 4) sets ``num_steps``; step-counting defaults
      (FlowEdit's ``n_max``) follow.
    - A method's reference settings for the family's kind of guidance (FlowEdit on FLUX: 28 steps, ``n_max`` 24,
      guidance 1.5 / 5.5).
    """
    params = dict(params)
    names = {p.name for p in info.params}
    if "inversion" in names and params.get("inversion") is None and not family.classifier_free:
        params["inversion"] = "ddim"
    if "num_steps" in names and params.get("num_steps") is None and family.default_steps is not None:
        params["num_steps"] = family.default_steps  # FLUX schnell: the few steps it is distilled for
    params = _with_reference_settings(info, family.guidance, params)
    if "guidance_scale" not in names or params.get("guidance_scale") is not None:
        return params
    inversion = params.get("inversion", info.param("inversion").default) if "inversion" in names else None
    if inversion == "ddim" and family.classifier_free:
        return params
    own = DEFAULT_GUIDANCE[inversion] if inversion else info.param("guidance_scale").default
    guidance = family.defaults.guidance_scale
    if guidance != own:  # the method's own default stays (and stays unset in the record) where the family agrees
        params["guidance_scale"] = guidance
    return params


def _with_reference_settings(info: MethodInfo, guidance: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the method's reference settings for this kind of guidance where unset; a step-counting one
    (FlowEdit's ``n_max``, 24 of FLUX's 28 steps) scaled to the steps run."""
    reference = info.settings_by_guidance.get(guidance, {})
    steps = int(params.get("num_steps") or reference.get("num_steps", 0))
    for name, value in reference.items():
        if params.get(name) is not None:
            continue
        if info.param(name).per_steps is not None and "num_steps" in reference:
            value = tuple(dict.fromkeys(max(1, round(v * steps / reference["num_steps"])) for v in value))
        params[name] = value
    return params


@dataclass
class Variant:
    """One edited image: the seed and the sweep values that made it, plus anything worth recording.

    ``knobs`` name the sweep values by label, as file names and grids show them (``K``: injection steps);
    ``params`` by parameter name, as the table gives them (``inject``: the ratio). A method fills ``params`` where
    a label's value is not the parameter's own (the front door fills in the rest).
    """

    seed: int
    knobs: dict[str, int | float]
    image: Image.Image
    record: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EditInput:
    """One image of an edit as every method sees it: prepared once by the front door (read, cropped, resized to
    the working size), its prompts, and the fields that identify model, image, dtype and device in stage cache
    keys."""

    image: Image.Image
    target_prompt: str
    source_prompt: str = ""
    cache_fields: dict[str, str] = field(default_factory=dict)
    mask: Any = None  # where the edit may change the image: (height, width) floats in [0, 1], or None
    record: dict[str, Any] = field(default_factory=dict)  # what edit.json says of the input (working size, mask)
    # the instruction for the methods that take one ("make the dog jump"; None: made from the target prompt) and
    # where it came from: "given" (the caller's) or "benchmark" (the dataset's own, PIE-Bench's editing_instruction)
    instruction: str | None = None
    instruction_source: str = "given"


@dataclass
class EditResult:
    """A finished edit of any method (the one result type), ready for :func:`nonrigid.methods.output.save_result`.

    ``params`` are every parameter of the method as resolved, with the values a method picked for parameters left
    to it; ``stages`` the method's reusable stage results (ours: its ``EditStages``, which later variants are
    sampled from without the earlier stages), kept in memory by the web page."""

    method: str
    input_image: Image.Image
    target_prompt: str
    source_prompt: str
    seeds: tuple[int, ...]
    params: dict[str, Any]
    variants: list[Variant]
    knob_labels: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    stages: Any = None


@dataclass(frozen=True)
class MethodContext:
    """What every image of one call shares: the method, its parameters (resolved), the seeds (the first only for
    a method whose result does not depend on it), the stage cache, progress and the sampling batch size."""

    info: MethodInfo
    params: dict[str, Any]
    seeds: tuple[int, ...] = (0,)
    cache: Any = None
    progress: Progress = False
    batch_size: int | None = None

    def result(
        self, edit: EditInput, variants: list[Variant], timings: Mapping[str, float], *,
        cache: Mapping[str, Any] | None = None, record: Mapping[str, Any] | None = None,
        chosen: Mapping[str, Any] | None = None, stages: Any = None,
    ) -> EditResult:
        """``edit``'s result: ``variants`` in grid order, stage ``timings``, cache hits, extra ``record`` fields,
        the values ``chosen`` for parameters left to the method (``none``: "the method picks")."""
        return EditResult(
            method=self.info.name, input_image=edit.image, target_prompt=edit.target_prompt,
            source_prompt=edit.source_prompt, seeds=self.seeds, params={**self.params, **(chosen or {})},
            variants=variants, knob_labels=tuple(p.label for p in self.info.sweeps), timings=dict(timings),
            cache=dict(cache or {}), record=dict(record or {}), model_fingerprint=edit.cache_fields.get("model", ""),
            stages=stages,
        )
