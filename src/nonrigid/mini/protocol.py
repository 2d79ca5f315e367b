"""What a miniature evaluation runs (torch-free, so the CLI checks its flags before loading anything heavy): ours'
etas, the baselines' settings on the miniature models and the :class:`Protocol` of one evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

ETAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

# baseline settings on the miniature model: each method's main knob swept over a range that spans "keeps the input"
# to "follows the text"; step counts as the references, except Imagic's fine-tuning (inside the paper's 50..400).
BASELINES: dict[str, dict] = {
    "imagic": {"alphas": (0.6, 0.8, 1.0, 1.2), "finetune_steps": 200},
    "masactrl": {"start_step": (4, 10, 20)},
    "edit-friendly": {"skip": (24, 36, 48, 60)},
    "dds": {"iterations": (25, 50, 100, 200)},
    "ledits": {"edit_guidance": (5.0, 10.0, 15.0)},
}
# the flow models' baseline (``mini-flow``): FlowEdit with the authors' SD3 settings, its edit steps swept around
# the reference's 33 of 50
FLOW_BASELINES: dict[str, dict] = {
    "flowedit": {"n_max": (20, 27, 33, 40)},
}


@dataclass(frozen=True)
class Protocol:
    """What one evaluation runs on each pair.

    ``seeds`` are the text-optimization seeds (the paper's "5 seeds per edit" vary stage A only: inversion and
    sampling are deterministic); ``etas`` are ours' sweep; ``ablation_etas`` (a subset of ``etas``) the etas at
    which the inversion and injection ablations are sampled, which cost one sampling per seed, eta and setting;
    ``world`` is the dataset's world seed, written into every row so that runs on several worlds can be pooled
    and told apart."""

    num_steps: int = 50
    opt_steps: int = 200
    seeds: tuple[int, ...] = (0,)
    etas: tuple[float, ...] = ETAS
    ablation_etas: tuple[float, ...] = ETAS
    ablation_seeds: int | None = None  # how many of ``seeds`` the ablations sample (None: all)
    ablations: bool = True
    world: int | None = None
    # ours' parameters where they differ from the paper's (a candidate preset: ``(("inversion", "npi"), ...)``),
    # and whether NTI-only editing runs beside it
    ours: tuple[tuple[str, Any], ...] = ()
    nti_only: bool = True
    # ours edits inside each pair's subject region (:func:`~nonrigid.mini.world.subject_region`)
    masked: bool = False

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not set(self.ablation_etas) <= set(self.etas):
            raise UsageError(f"the ablation etas {self.ablation_etas} must be among ours' etas {self.etas}")
        if any(not 0.0 <= e <= 1.0 for e in self.etas):
            raise UsageError(f"etas must be in [0, 1], got {self.etas}")
        if self.ablation_seeds is not None and not 1 <= self.ablation_seeds <= len(self.seeds):
            raise UsageError(f"the ablations sample 1 to {len(self.seeds)} seeds, got {self.ablation_seeds}")

    @property
    def seeds_of_ablations(self) -> tuple[int, ...]:
        return self.seeds[: self.ablation_seeds] if self.ablation_seeds is not None else self.seeds

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "opt_steps": self.opt_steps, "seeds": list(self.seeds),
                "etas": list(self.etas), "ablation_etas": list(self.ablation_etas),
                **({"ablation_seeds": self.ablation_seeds} if self.ablation_seeds is not None else {}),
                "ablations": self.ablations, "world": self.world,
                # only where set, so that the runs made before these existed resume
                **({"ours": {k: list(v) if isinstance(v, tuple) else v for k, v in self.ours}} if self.ours else {}),
                **({"nti_only": False} if not self.nti_only else {}),
                **({"masked": True} if self.masked else {})}
