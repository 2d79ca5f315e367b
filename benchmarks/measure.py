"""Measuring tools for the benchmark: UNet work and time (forward hooks), peak memory, sections of a run.

UNet work is counted in *sample evaluations*: a forward pass of one batch row counts 1, a forward pass whose
output is back-propagated (text optimization, null-text inversion) counts 2 per row. The counter uses PyTorch's
public hook API on ``pipe.unet`` (nothing in diffusers is patched) and removes its hooks when it is closed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class UNetTally:
    """UNet work so far. ``units`` = forward rows + backward rows (the issue's count)."""

    calls: int = 0
    forward_rows: int = 0
    backward_rows: int = 0
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0

    @property
    def units(self) -> int:
        return self.forward_rows + self.backward_rows

    @property
    def seconds(self) -> float:
        return self.forward_seconds + self.backward_seconds

    def __sub__(self, other: UNetTally) -> UNetTally:
        return UNetTally(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def astuple(tally: UNetTally) -> tuple:
    return tuple(asdict(tally).values())


class UNetCounter:
    """Counts and times every call of ``unet`` while open (``with UNetCounter(pipe.unet) as counter: ...``).

    Forward time is measured between a forward pre-hook and a forward hook. When the output takes part in autograd
    (the weights are frozen, so only because an input requires grad), its rows count twice and the backward pass is
    timed from the moment the output's gradient arrives to the moment the gradient of the input that required it is
    ready (tensor hooks, removed once they fired). On CUDA the hooks synchronise the device so times are real.
    Limitation: a backward pass is assumed to follow every grad-carrying forward, as it does in the stages.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.tally = UNetTally()
        self._sync = unet.device.type == "cuda"
        self._started = 0.0
        self._backward_started: float | None = None
        # With a torch.compile'd UNet the hooks run eagerly around the compiled graph (clocks are not traceable).
        self._handles = [
            unet.register_forward_pre_hook(torch.compiler.disable(self._before_forward), with_kwargs=True),
            unet.register_forward_hook(torch.compiler.disable(self._after_forward), with_kwargs=True),
        ]

    def __enter__(self) -> UNetCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def snapshot(self) -> UNetTally:
        return UNetTally(*astuple(self.tally))

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize(self.unet.device)
        return time.perf_counter()

    def _before_forward(self, module, args, kwargs) -> None:
        self._started = self._now()

    def _after_forward(self, module, args, kwargs, output) -> None:
        self.tally.forward_seconds += self._now() - self._started
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet or transformer
        rows = int(sample.shape[0])
        self.tally.calls += 1
        self.tally.forward_rows += rows
        result = output.sample if hasattr(output, "sample") else output[0]
        if result.requires_grad:
            self.tally.backward_rows += rows
            self._time_backward(result, [*args, *kwargs.values()])

    def _time_backward(self, output: torch.Tensor, inputs: list) -> None:
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        if not leaves:
            return  # trainable weights (not the stages' case): counted, not timed
        handles: list = []

        def started(grad: torch.Tensor) -> None:
            self._backward_started = self._now()

        def finished(grad: torch.Tensor) -> None:
            if self._backward_started is not None:
                self.tally.backward_seconds += self._now() - self._backward_started
                self._backward_started = None
            for handle in handles:
                handle.remove()

        output.register_hook(started)
        handles.extend(x.register_hook(finished) for x in leaves)


class PeakMemory:
    """Peak memory during a section: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's resident set
    size, polled every ``interval`` seconds by a background thread (psutil)."""

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            process = psutil.Process()
            self.peak_bytes = process.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(self.interval):
                    self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            import psutil

            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


@dataclass
class Section:
    """One measured part of a run: wall time, UNet work and time, peak memory."""

    name: str
    seconds: float = 0.0
    unet: UNetTally = field(default_factory=UNetTally)
    peak_bytes: int = 0

    @property
    def unet_share(self) -> float:
        return self.unet.seconds / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "unet_units": self.unet.units,
                "unet_calls": self.unet.calls, "unet_forward_rows": self.unet.forward_rows,
                "unet_backward_rows": self.unet.backward_rows, "unet_seconds": self.unet.seconds,
                "unet_share": self.unet_share, "peak_bytes": self.peak_bytes}


class Recorder:
    """Runs named sections under one :class:`UNetCounter` and keeps a :class:`Section` for each."""

    def __init__(self, counter: UNetCounter, device: torch.device, after=None) -> None:
        """``after(recorder)``, if given, is called once each section is recorded: a long run saves what it has
        measured so far there, so that a run stopped at a time limit still leaves its finished sections."""
        self.counter = counter
        self.device = device
        self.sections: dict[str, Section] = {}
        self.after = after

    def _recorded(self) -> None:
        if self.after is not None:
            self.after(self)

    def measure(self, name: str, work, *args, **kwargs):
        """Call ``work(*args, **kwargs)`` as section ``name``; returns its result."""
        before = self.counter.snapshot()
        with PeakMemory(self.device) as memory:
            started = self.counter._now()
            result = work(*args, **kwargs)
            seconds = self.counter._now() - started
        self.sections[name] = Section(name, seconds, self.counter.snapshot() - before, memory.peak_bytes)
        self._recorded()
        return result

    def total(self, name: str, parts: list[str]) -> Section:
        """A section made of several measured ones (times and work add up, the peak is the largest)."""
        sections = [self.sections[p] for p in parts]
        tally = UNetTally()
        for s in sections:
            tally = UNetTally(*(a + b for a, b in zip(astuple(tally), astuple(s.unet), strict=True)))
        total = Section(name, sum(s.seconds for s in sections), tally, max(s.peak_bytes for s in sections))
        self.sections[name] = total
        self._recorded()
        return total
