"""Each method's knobs as page controls, built from the method catalogue (its defaults, bounds and help text): the
page keeps no second list of parameters.

Gradio-free: a :class:`Knob` says which control a parameter gets; :mod:`.app` makes the control. Values come
back from the page as the controls hold them and become method parameters through the catalogue's own parsing
and checks (:func:`~nonrigid.methods.base.resolve_params`), as ``--set`` values do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..methods.base import Param
from ..methods.catalogue import METHODS, method_info

MAIN = frozenset({"num_steps"})  # shown unfolded besides each method's sweeps


@dataclass(frozen=True)
class Knob:
    """One parameter of one method as a control: ``control`` is ``number``, ``text``, ``choice`` or ``check``."""

    method: str
    param: Param
    control: str
    default: Any  # the control's initial value
    folded: bool  # under "more settings"

    @property
    def label(self) -> str:
        return self.param.name.replace("_", " ")

    @property
    def api_name(self) -> str:
        """The knob's keyword in the page's API: ``ours_num_steps``."""
        return f"{self.method}_{self.param.name}".replace("-", "_")

    @property
    def choices(self) -> tuple[str, ...]:
        return ("none", *self.param.choices) if self.param.optional else self.param.choices

    @property
    def info(self) -> str:
        """The catalogue's help text, with the bounds and the sweep convention."""
        bounds = []
        if self.param.low is not None:
            bounds.append(f"{'>' if self.param.open_low else '>='} {self.param.low:g}")
        if self.param.high is not None:
            bounds.append(f"<= {self.param.high:g}")
        extra = [", ".join(bounds)] if bounds else []
        if self.param.is_sweep:
            extra.append("comma-separated: one variant per value")
        if self.param.optional:
            extra.append("none: the method picks")
        return self.param.help + (f" ({'; '.join(extra)})" if extra else "")

    def value(self, shown: Any) -> Any | None:
        """The parameter value a control's content stands for, or None where it still shows the default (the
        method then applies its own default, which may follow other parameters or the model family)."""
        if self.control == "number":
            if shown is None or float(shown) == float(self.default):
                return None
            return int(shown) if self.param.kind == "int" and float(shown).is_integer() else shown
        if self.control == "check":
            return None if bool(shown) == self.default else bool(shown)
        text = "" if shown is None else str(shown).strip()
        return None if text == str(self.default).strip() else text  # qwen-edit's negative prompt " " shows blank


def knobs_of(method: str) -> list[Knob]:
    """The controls of ``method``, in its table's order."""
    return [_knob(method, p) for p in method_info(method).params]


def all_knobs(methods: Sequence[str] = tuple(METHODS)) -> list[Knob]:
    return [k for m in methods for k in knobs_of(m)]


def params_from(knobs: Sequence[Knob], values: Sequence[Any], method: str) -> dict[str, Any]:
    """The parameters ``method``'s controls set away from their defaults (others are left to the method)."""
    params = {}
    for knob, shown in zip(knobs, values, strict=True):
        if knob.method != method:
            continue
        value = knob.value(shown)
        if value is not None:
            params[knob.param.name] = value
    return params


def _knob(method: str, p: Param) -> Knob:
    folded = not (p.is_sweep or p.name in MAIN)
    if p.kind == "bool":
        return Knob(method, p, "check", bool(p.default), folded)
    if p.kind == "str" and p.choices:
        return Knob(method, p, "choice", "none" if p.default is None else p.default, folded)
    if p.kind in ("int", "float") and not p.optional:
        return Knob(method, p, "number", p.default, folded)
    return Knob(method, p, "text", _text(p), folded)


def _text(p: Param) -> str:
    if p.default is None:
        return "none"
    if p.is_sweep:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in p.default)
    return f"{p.default:g}" if isinstance(p.default, float) else str(p.default)
