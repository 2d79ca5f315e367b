"""The benchmark on Ray: workers that each load the model once and compute jobs, and a driver that alone stores
them. Torch-free and Ray-free at import (Ray is an optional extra: ``pip install 'nonrigid[ray]'``).

One worker (a Ray actor) per GPU, or per ``cpus_per_worker`` cores on a cluster without GPUs, runs one job at a
time; the driver hands jobs out as workers free up (``ray.wait``) and stores each finished one exactly as a serial
run does (:func:`~.bench.store_job`: images first, then rows and stage entries in one transaction), so rows,
images and resumability are a serial run's.

Equal results need the stage cache a serial run would have shown each job. Cache keys hash the input image, so
only jobs of the same image share entries; those jobs form a *group* that runs in serial order, one job at a time
(on one worker while it lives), and each job sees exactly the entries its group's committed jobs wrote. A worker
keeps entries in a folder of its own; the driver sends it the committed entries of a group it has not seen (after
a worker died, or on resume) and writes the entries a job returns into the run's cache when it commits the job.

Faults: a worker that dies mid-job (killed, out of memory, its node gone) loses that job only; the job goes back
to the front of its group, a new worker replaces the dead one, and nothing of the lost job was stored. A job lost
``max_attempts`` times ends the run with a one-line error. A killed driver takes its workers with it; the same
command again resumes from the committed jobs, as a serial run does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NonrigidError, UsageError, first_line
from .bench import BenchStats, JobOutput, compute_job, pending_jobs, store_job
from .plan import BenchSpec, Job
from .runfolder import RunCache, RunFolder

LOCAL = "local"  # a Ray instance of our own on this machine, bound to 127.0.0.1
MISSING_RAY = "running on Ray needs Ray: pip install 'nonrigid[ray]'"
# Test hook: a worker that removes this file (only one can) SIGKILLs itself after computing its job.
KILL_FILE_ENV = "NONRIGID_TEST_KILL_WORKER_FILE"

Entry = tuple[str, str]  # (stage, key) of a stage cache entry


def import_ray() -> Any:
    """Ray, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UsageError(MISSING_RAY) from None
    return ray


def connect(address: str | None = LOCAL, *, num_cpus: int | None = None) -> bool:
    """Join a Ray cluster (``"auto"`` or an address) or start a local instance on 127.0.0.1 (``"local"``); returns
    whether this call started Ray (and so should shut it down). An already initialized Ray is used as it is."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # Ray's core: no retry warnings on stderr
    local = address in (None, LOCAL)
    if local:  # loopback only: Ray otherwise binds the machine's outward address
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR, "include_dashboard": False}
    if local:
        from ray._private import ray_constants  # read when Ray picks the node address; the variable above is read
        ray_constants.ENABLE_RAY_CLUSTER = False  # at import, which may have happened before

        options.update(address=LOCAL, num_cpus=num_cpus or os.cpu_count() or 1, _node_ip_address="127.0.0.1")
    else:
        options.pop("include_dashboard")
        options["address"] = address
    try:
        ray.init(**options)
    except ConnectionError as err:
        raise UsageError(f"cannot reach the Ray cluster at {address} ({first_line(err)}); is it running, and, if it "
                         "uses token authentication, are RAY_AUTH_MODE=token and its token set here?") from None
    return True


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker loads its model and metrics: names and paths, not objects (each worker loads its own, once).

    ``metrics``: the metric options of the run's identity (``kind`` and the weights' paths); ``threads``: torch's
    CPU threads in the worker (the cores it was given).
    """

    model: str
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    config: str | None = None
    low_memory: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    piebench: bool = False  # PIE-Bench's metrics too

    def load(self) -> tuple[Any, Any]:
        import torch

        from ..models.loading import configure_model, load_model
        from .bench import load_metrics

        if self.threads:
            torch.set_num_threads(self.threads)
        _quiet_libraries()
        model = load_model(self.model, self.device, self.dtype, allow_pickle=self.allow_pickle, config=self.config)
        model = configure_model(model, low_memory=self.low_memory, compile=self.compile,
                                cuda_graphs=self.cuda_graphs)
        options = {k: v for k, v in self.metrics.items() if k != "kind"}
        return model, load_metrics(self.metrics.get("kind", "default"), device=model.device, piebench=self.piebench,
                                   **options)


def _quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


class BenchWorker:
    """One worker: the model and metrics loaded once, then jobs one after another (made a Ray actor by
    :func:`run_distributed`). A failure to load is kept and reported by :meth:`describe`, as a one-line error."""

    def __init__(self, setup: WorkerSetup, spec: BenchSpec):
        self.spec = spec
        self.folder = Path(tempfile.mkdtemp(prefix="nonrigid-worker-"))
        self.cache = RunCache(self.folder / "cache", set())
        self.images: dict[str, Path] = {}
        self.error: str | None = None
        try:
            self.model, self.metrics = setup.load()
        except NonrigidError as err:
            self.error = str(err)

    def describe(self) -> dict[str, Any]:
        """What the run's ``meta`` table records of the workers' model and metrics (or the load error)."""
        if self.error is not None:
            return {"error": self.error}
        import socket

        from ..models.fingerprint import model_fingerprint
        from ..models.loading import describe_device

        describe = getattr(self.metrics, "describe", None)
        return {"model_fingerprint": model_fingerprint(self.model), **describe_device(self.model),
                "metrics": describe() if callable(describe) else {}, "host": socket.gethostname()}

    def run(self, job: Job, image: bytes, visible: Sequence[Entry], entries: dict[Entry, bytes]) \
            -> tuple[JobOutput, dict[Entry, bytes]]:
        """Compute ``job`` seeing exactly the stage entries ``visible`` (its group's committed ones; ``entries``
        holds the files of those this worker lacks); returns the job and the files of the entries it wrote."""
        for (stage, key), data in entries.items():
            self.cache.put(stage, key, data)
        self.cache.committed = set(visible)
        self.cache.pending.clear()
        local = replace(job, pair=replace(job.pair, image=self._image(job, image)))
        output = compute_job(local, self.spec, self.model, self.metrics, self.cache)
        written = {entry: self.cache.path(*entry).read_bytes() for entry in output.entries}
        _test_kill_hook()
        return output, written

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _image(self, job: Job, data: bytes) -> Path:
        """The job's input image as a file here (the data folder need not exist on this node)."""
        digest = hashlib.sha256(data).hexdigest()[:16]
        if digest not in self.images:
            path = self.folder / "images" / digest / Path(job.pair.img_name).name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.images[digest] = path
        return self.images[digest]


def _test_kill_hook() -> None:
    marker = os.environ.get(KILL_FILE_ENV)
    if not marker:
        return
    try:
        os.unlink(marker)  # exactly one worker wins
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def worker_plan(resources: dict[str, float], cpus_per_worker: int, groups: int) -> tuple[int, dict[str, Any]]:
    """How many workers, and each one's Ray resources: one per GPU if the cluster has GPUs, else one per
    ``cpus_per_worker`` cores; never more than there are groups of jobs to run."""
    if cpus_per_worker < 1:
        raise UsageError(f"cpus_per_worker must be >= 1, got {cpus_per_worker}")
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        return max(1, min(gpus, groups)), {"num_gpus": 1, "num_cpus": min(1, cpus)}
    if cpus < cpus_per_worker:
        raise UsageError(f"cpus_per_worker must be <= the Ray cluster's {cpus} CPUs (it has no GPU), got "
                         f"{cpus_per_worker}")
    return max(1, min(cpus // cpus_per_worker, groups)), {"num_cpus": cpus_per_worker}


# --------------------------------------------------------------------------------------------------- driver


class Groups:
    """The jobs still to run, by group (jobs on the same input image, in the serial run's order): a group runs one
    job at a time, and a worker keeps to its group while that has jobs. Ray-free, so it can be tested alone."""

    def __init__(self, jobs: Sequence[Job], group_of: Callable[[Job], str]):
        self.queues: dict[str, deque[Job]] = {}
        for job in jobs:
            self.queues.setdefault(group_of(job), deque()).append(job)
        self.busy: set[str] = set()

    def take(self, preferred: str | None) -> tuple[str, Job] | None:
        """The next job for a worker that last ran group ``preferred``: that group's next job, else the first
        waiting group's (None when every group is done or running)."""
        order = [preferred] if preferred in self.queues else []
        for group in [*order, *self.queues]:
            if group not in self.busy and self.queues[group]:
                self.busy.add(group)
                return group, self.queues[group].popleft()
        return None

    def finished(self, group: str) -> None:
        self.busy.discard(group)

    def requeue(self, group: str, job: Job) -> None:
        """A lost job goes back to the front of its group, to run before the group's later jobs."""
        self.queues[group].appendleft(job)
        self.busy.discard(group)

    def remaining(self) -> bool:
        return any(self.queues.values())


@dataclass
class _Worker:
    handle: Any
    ready: Any  # the describe() call that says the worker has loaded its model
    held: set[Entry] = field(default_factory=set)  # committed entries in the worker's own folder
    group: str | None = None


# Ray's errors for a worker (or its node, or its result) that is gone, as opposed to a job that raised
LOST_ERRORS = ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "ObjectLostError", "NodeDiedError")


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    return tuple(getattr(ray.exceptions, name) for name in LOST_ERRORS if hasattr(ray.exceptions, name))


def run_distributed(
    spec: BenchSpec,
    run: RunFolder,
    setup: WorkerSetup,
    *,
    cpus_per_worker: int = 1,
    max_attempts: int = 3,
    progress: bool = False,
) -> BenchStats:
    """Run every job of ``spec`` that ``run`` does not hold yet on the connected Ray cluster (:func:`connect`),
    storing each in ``run`` as it finishes. Returns the counts of a serial run."""
    from tqdm.auto import tqdm

    ray = import_ray()
    jobs, todo = spec.jobs(), pending_jobs(spec, run)
    stats = BenchStats(jobs=len(jobs), done_before=len(jobs) - len(todo))
    if not todo:
        return stats
    driver = _Driver(ray, spec, run, setup, todo, cpus_per_worker, max_attempts)
    bar = tqdm(total=len(jobs), initial=stats.done_before, desc="bench", unit="job", disable=not progress)
    try:
        with bar:
            for job, output in driver.finished_jobs():
                stats.ran += 1
                stats.edits += output.edits
                bar.set_postfix_str(f"{job.pair.slug} {job.method} {job.setting.label}"[:60])
                bar.update(1)
    finally:
        driver.close()
    return stats


class _Driver:
    """The scheduling loop of :func:`run_distributed`: workers, the jobs they hold, and the cache entries each
    group has committed (the only state besides the run folder)."""

    def __init__(self, ray: Any, spec: BenchSpec, run: RunFolder, setup: WorkerSetup, todo: list[Job],
                 cpus_per_worker: int, max_attempts: int):
        self.ray, self.run, self.max_attempts = ray, run, max_attempts
        images = {p.index: _read(p.image) for p in spec.pairs}
        self.group_of_pair = {index: hashlib.sha256(data).hexdigest() for index, data in images.items()}
        self.image_refs = {group: ray.put(images[index]) for index, group in self.group_of_pair.items()}
        self.groups = Groups(todo, lambda job: self.group_of_pair[job.pair.index])
        self.committed = _committed_entries(run, self.group_of_pair)
        self.count, resources = worker_plan(ray.cluster_resources(), cpus_per_worker, len(self.groups.queues))
        if not setup.threads and "num_gpus" not in resources:
            setup = replace(setup, threads=cpus_per_worker)
        self.setup, self.spec_ref = setup, ray.put(spec)
        self.actor = ray.remote(max_restarts=0, max_task_retries=0, **resources)(BenchWorker)
        self.lost_errors = _lost_errors(ray)
        self.workers = [self.start() for _ in range(self.count)]
        self.idle: list[_Worker] = []
        self.running: dict[Any, tuple[_Worker, str, Job]] = {}
        self.attempts: dict[str, int] = {}
        self.load_losses = 0
        self.described = False

    def start(self) -> _Worker:
        handle = self.actor.remote(self.setup, self.spec_ref)
        return _Worker(handle, handle.describe.remote())

    def finished_jobs(self) -> Iterator[tuple[Job, JobOutput]]:
        """Hand out jobs and store them as they finish, yielding each stored one."""
        while self.groups.remaining() or self.running:
            self.dispatch()
            waiting = [w.ready for w in self.workers if w.ready is not None]
            (ref,), _ = self.ray.wait([*self.running, *waiting], num_returns=1)
            if ref in self.running:
                finished = self.collect(ref)
                if finished is not None:
                    yield finished
            else:
                self.loaded(next(w for w in self.workers if w.ready == ref))

    def dispatch(self) -> None:
        """Each idle worker gets its group's next job (else the first waiting group's), with the committed cache
        entries of that group it does not hold yet."""
        for worker in list(self.idle):
            chosen = self.groups.take(worker.group)
            if chosen is None:
                return
            group, job = chosen
            self.idle.remove(worker)
            worker.group = group
            visible = self.committed.setdefault(group, set())
            entries = {e: self.run.cache.path(*e).read_bytes() for e in visible - worker.held}
            worker.held |= set(entries)
            ref = worker.handle.run.remote(job, self.image_refs[group], sorted(visible), entries)
            self.running[ref] = (worker, group, job)

    def loaded(self, worker: _Worker) -> None:
        """A worker finished loading its model (or died doing it, or could not load it)."""
        ref, worker.ready = worker.ready, None
        try:
            info = self.ray.get(ref)
        except self.lost_errors as err:
            if getattr(err, "actor_init_failed", False):  # not a lost worker: loading raised (a bug), say so
                raise
            self.load_losses += 1
            if self.load_losses >= self.max_attempts * self.count:
                raise NonrigidError(f"Ray workers died while loading the model {self.load_losses} times (last: "
                                    f"{type(err).__name__}); giving up") from None
            self.replace(worker)
            return
        if "error" in info:
            raise NonrigidError(f"a Ray worker could not load the model or metrics: {info['error']}")
        if not self.described:
            self.run.set_meta(**info, workers=len(self.workers), cache_dir=str(self.run.cache.root))
            self.described = True
        self.idle.append(worker)

    def collect(self, ref: Any) -> tuple[Job, JobOutput] | None:
        """Store a finished job; a job whose worker died goes back to its group (None)."""
        worker, group, job = self.running.pop(ref)
        try:
            output, written = self.ray.get(ref)
        except self.lost_errors as err:
            self.attempts[job.key] = self.attempts.get(job.key, 0) + 1
            if self.attempts[job.key] >= self.max_attempts:
                raise NonrigidError(f"job {job.key} was lost with its Ray worker {self.max_attempts} times (last: "
                                    f"{type(err).__name__}); giving up") from None
            self.groups.requeue(group, job)
            self.replace(worker)
            return None
        except self.ray.exceptions.RayTaskError as err:  # the job raised: as in a serial run, the run stops
            cause = getattr(err, "cause", None)
            raise cause if isinstance(cause, NonrigidError) else err from None
        store_job(self.run, output, written)
        self.committed[group] |= set(output.entries)
        worker.held |= set(output.entries)
        self.groups.finished(group)
        self.idle.append(worker)
        return job, output

    def replace(self, worker: _Worker) -> None:
        _kill(self.ray, worker)
        self.workers.remove(worker)
        self.workers.append(self.start())

    def close(self) -> None:
        """Workers remove their folders and end (a killed driver's workers are ended by Ray itself)."""
        self.ray.wait([w.handle.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        for worker in self.workers:
            _kill(self.ray, worker)


def _kill(ray: Any, worker: _Worker) -> None:
    with contextlib.suppress(Exception):  # already gone
        ray.kill(worker.handle)


def _committed_entries(run: RunFolder, group_of_pair: dict[int, str]) -> dict[str, set[Entry]]:
    """The stage entries finished jobs of ``run`` wrote, by the group of the job's pair (a job key starts with its
    pair's index)."""
    entries: dict[str, set[Entry]] = {}
    for stage, key, job in run.db.execute("SELECT stage, key, job FROM stage_entries"):
        index = job.split("/", 1)[0]
        if index.isdigit() and int(index) in group_of_pair:
            entries.setdefault(group_of_pair[int(index)], set()).add((stage, key))
    return entries


def _read(path: Any) -> bytes:
    if not Path(path).is_file():
        raise UsageError(f"image {path} does not exist")
    return Path(path).read_bytes()
