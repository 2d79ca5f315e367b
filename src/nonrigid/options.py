"""Names and defaults shared by the library and the CLI, importable without torch (so `nonrigid --help` and
usage errors answer at once)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
INVERSION_METHODS = ("nti", "ddim", "npi")
DEFAULT_GUIDANCE = {"nti": 7.5, "ddim": 1.0, "npi": 7.5}
DEFAULT_ETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_INJECT = (0.2,)


@dataclass
class EditSettings:
    """Every parameter of an edit, with the paper's defaults."""

    target_prompt: str
    source_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    etas: tuple[float, ...] = DEFAULT_ETAS
    inject: tuple[float, ...] = DEFAULT_INJECT
    num_steps: int = 50
    opt_steps: int = 200
    opt_lr: float = 1e-3
    inversion: str = "nti"
    guidance_scale: float | None = None
    inner_steps: int = 10
    early_stop: float = 1e-5
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.etas = tuple(float(e) for e in self.etas)
        self.inject = tuple(float(r) for r in self.inject)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` for values that make no sense, before any work starts."""
        checks = [
            (self.num_steps >= 1, f"--steps must be a positive number of sampling steps, got {self.num_steps}"),
            (1 <= self.num_steps <= 1000, f"--steps must be at most 1000, got {self.num_steps}"),
            (self.opt_steps >= 0, f"--opt-steps must be >= 0 (0 skips text optimization), got {self.opt_steps}"),
            (self.opt_lr > 0, f"--opt-lr must be positive, got {self.opt_lr}"),
            (self.inner_steps >= 0, f"--inner-steps must be >= 0, got {self.inner_steps}"),
            (
                self.inversion in INVERSION_METHODS,
                f"--inversion must be one of {', '.join(INVERSION_METHODS)}, got {self.inversion!r}",
            ),
            (bool(self.seeds), "give at least one --seed"),
            (bool(self.etas), "give at least one --eta"),
            (bool(self.inject), "give at least one --inject ratio"),
            (self.batch_size is None or self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
        ]
        checks += [(0.0 <= e <= 1.0, f"--eta values must be in [0, 1], got {e}") for e in self.etas]
        checks += [(0.0 <= r <= 1.0, f"--inject ratios must be in [0, 1], got {r}") for r in self.inject]
        if self.guidance_scale is not None:
            checks.append((self.guidance_scale >= 1.0, f"--guidance must be >= 1, got {self.guidance_scale}"))
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def guidance(self) -> float:
        return DEFAULT_GUIDANCE[self.inversion] if self.guidance_scale is None else float(self.guidance_scale)

    def inject_steps(self) -> tuple[int, ...]:
        """Injection ratios as step counts K = round(ratio * N), without duplicates, in the given order."""
        return tuple(dict.fromkeys(round(r * self.num_steps) for r in self.inject))
