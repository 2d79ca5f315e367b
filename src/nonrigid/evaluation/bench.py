"""The benchmark: every (pair, method, setting) of a TEdBench- or PIE-Bench-layout folder, resumable, one SQLite row
per edit (PIE-Bench pairs, which carry a mask, also get PIE-Bench's metric columns).

:mod:`.plan` says what a run computes (settings, jobs, :class:`~.plan.BenchSpec`), :mod:`.runfolder` where and how
it is stored; this module runs the jobs a run folder does not hold yet. The benchmark knows no method and no
dataset by name: every method is run through :func:`~nonrigid.methods.run.run_edits`, and each edit's
parameters are the job's with the variant's own sweep values (``Variant.params``). Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..timing import Stopwatch
from .plan import BenchSpec, Job
from .protocol import METRIC_NAMES, PIE_METRIC_NAMES
from .runfolder import RunFolder


def load_metrics(kind: str = "default", *, clip_model: str | None = None, lpips_weights: str | None = None,
                 vgg_weights: str | None = None, aesthetic_head: str | None = None, device: Any = None,
                 piebench: bool = False, dino_model: str | None = None, squeezenet_weights: str | None = None):
    """The metrics of the evaluation protocol, every network loaded now (a missing weight file fails before the
    first edit, not after it), PIE-Bench's too with ``piebench``; ``kind="tiny"``: random backbones, for tests
    only."""
    from .metrics import Metrics

    if kind == "tiny":
        return Metrics.tiny(seed=0)
    options = {"lpips_weights": lpips_weights, "vgg_weights": vgg_weights, "aesthetic_head": aesthetic_head,
               "device": device, "squeezenet_weights": squeezenet_weights,
               **({"dino_model": dino_model} if dino_model else {})}
    metrics = Metrics(clip_model, **options) if clip_model else Metrics(**options)
    return metrics.load(piebench=piebench)


@dataclass
class BenchStats:
    jobs: int = 0
    done_before: int = 0
    ran: int = 0
    edits: int = 0


def pending_jobs(spec: BenchSpec, run: RunFolder) -> list[Job]:
    done = run.done_jobs()
    return [job for job in spec.jobs() if job.key not in done]


def run_benchmark(
    spec: BenchSpec,
    run: RunFolder,
    model: Any,
    metrics: Any,
    *,
    progress: bool = False,
    pairs_per_batch: int = 1,
    methods: Collection[str] | None = None,
) -> BenchStats:
    """Run every job of ``spec`` that ``run`` does not hold yet, committing each when its images are on disk.

    ``pairs_per_batch`` > 1: pending jobs of a method that batches across images (ours), with the same setting
    and seeds, run ``pairs_per_batch`` pairs at a time as one model batch (:func:`job_groups`); each job is still
    saved, scored and committed on its own, and its results equal its run alone up to the last bits of batched
    products. A job's seconds are then its share of its batch.

    ``methods``: only these methods' jobs (those that run on ``model``, where methods have models of their own:
    ``BenchSpec.method_models``); None: every job."""
    from tqdm.auto import tqdm

    if pairs_per_batch < 1:
        raise UsageError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    jobs = [job for job in spec.jobs() if methods is None or job.method in methods]
    todo = [job for job in pending_jobs(spec, run) if methods is None or job.method in methods]
    stats = BenchStats(jobs=len(jobs), done_before=len(jobs) - len(todo))
    bar = tqdm(total=len(jobs), initial=stats.done_before, desc="bench", unit="job", disable=not progress)
    with bar:
        for group in job_groups(todo, pairs_per_batch):
            first = group[0]
            more = f" +{len(group) - 1} pairs" if len(group) > 1 else ""
            bar.set_postfix_str(f"{first.pair.slug}{more} {first.method} {first.setting.label}"[:60])
            run.cache.pending.clear()  # entries of a job that failed before this one in this process do not count
            for job, result in zip(group, edit_jobs(group, spec, model, run.cache), strict=True):
                output = job_output(job, result, metrics, run.cache)  # the group's entries go with its first job
                store_job(run, output)
                stats.edits += output.edits
                stats.ran += 1
                bar.update(1)
    return stats


def job_groups(todo: list[Job], pairs_per_batch: int) -> list[list[Job]]:
    """Jobs in the order they run: jobs of a method that batches across images, with the same setting and seeds,
    gathered ``pairs_per_batch`` at a time (a group runs where its first job stood); every other job alone."""
    from ..methods.catalogue import method_info

    groups: list[list[Job]] = []
    open_groups: dict[tuple, list[Job]] = {}
    for job in todo:
        if pairs_per_batch == 1 or not method_info(job.method).batches_images:
            groups.append([job])
            continue
        key = (job.method, job.setting.slug, job.seeds)
        group = open_groups.get(key)
        if group is None or len(group) == pairs_per_batch:
            group = open_groups[key] = []
            groups.append(group)
        group.append(job)
    return groups


def edit_jobs(group: list[Job], spec: BenchSpec, model: Any, cache: Any) -> list[Any]:
    """The edits of jobs that share method, setting and seeds, as one call of the front door (one model batch
    where the method can), reading and writing stage entries through ``cache``."""
    from ..methods.run import EditRequest, run_edits

    first = group[0]
    requests = [EditRequest(job.pair.image, job.pair.target_text, job.source_prompt, spec.mask_of(job.pair),
                            job.pair.instruction or None, "benchmark") for job in group]
    return run_edits(model, requests, first.method, first.setting.params, seeds=first.seeds, size=spec.size,
                     crop=spec.crop, cache=cache, batch_size=spec.runtime.get("batch_size"))


@dataclass
class JobOutput:
    """What one job computed, before anything of it is stored: the images as PNG bytes (by their path in the run
    folder), the ``jobs`` row and the ``edits`` rows, and the stage cache entries the job wrote. The split lets a
    worker elsewhere compute a job and the run folder's owner store it, with the same bytes and rows as a serial
    run (:mod:`.distributed`)."""

    job: str
    files: dict[str, bytes]
    job_row: dict[str, Any]
    rows: list[dict[str, Any]]
    entries: list[tuple[str, str]] = field(default_factory=list)

    @property
    def edits(self) -> int:
        return len(self.rows)


def compute_job(job: Job, spec: BenchSpec, model: Any, metrics: Any, cache: Any) -> JobOutput:
    """Edit and score one job, storing nothing but stage cache entries (into ``cache``, a
    :class:`~.runfolder.RunCache` whose ``pending`` names the entries this job wrote): what a Ray worker runs."""
    (result,) = edit_jobs([job], spec, model, cache)
    return job_output(job, result, metrics, cache)


def job_output(job: Job, result: Any, metrics: Any, cache: Any) -> JobOutput:
    """A job's edit scored, as files and rows to store, with the stage entries ``cache`` holds pending."""
    from ..methods.output import variant_filename
    from .runfolder import png_bytes

    input_path = f"inputs/{job.pair.slug}.png"
    paths = [f"{job.folder}/{variant_filename(v.seed, v.knobs)}" for v in result.variants]
    if len(set(paths)) != len(paths):
        raise UsageError(f"{job.method}: two variants of one job got the same file name; give distinct sweep values")
    files = {input_path: png_bytes(result.input_image)}
    files.update((path, png_bytes(variant.image)) for path, variant in zip(paths, result.variants, strict=True))
    count = len(result.variants)
    instruction = {k: result.record[k] for k in ("instruction", "instruction_source") if k in result.record}
    watch = Stopwatch()
    masks = {"masks": [job.pair.mask] * count} if job.pair.mask is not None else {}  # a PIE-Bench pair
    with watch("scoring"):
        scores = metrics.score_batch([result.input_image] * count, [v.image for v in result.variants],
                                     [job.pair.target_text] * count, **masks)
    timings = {**result.timings, **watch.seconds}
    total = result.timings["total"]
    rows = []
    for path, variant, score in zip(paths, result.variants, scores, strict=True):
        rows.append({
            "job": job.key, "pair": job.pair.index, "image_name": job.pair.img_name,
            "target_text": job.pair.target_text, "source_prompt": job.source_prompt, "method": job.method,
            "setting": job.setting.label, "seed": variant.seed, "knobs": variant.knobs,
            "params": edit_params(result.params, variant), **{m: score.get(m) for m in METRIC_NAMES},
            **{m: finite_or_none(score.get(m)) for m in PIE_METRIC_NAMES}, "edit_type": job.pair.edit_type or None,
            "image": path, "record": {**instruction, **variant.record, "input": input_path},
            "job_seconds": total, "seconds_per_edit": total / count, "timings": timings, "cache": result.cache,
        })
    job_row = {"job": job.key, "pair": job.pair.index, "method": job.method, "setting": job.setting.label,
               "params": result.params, "edits": count, "seconds": total, "timings": timings,
               "cache": result.cache, "record": result.record}
    return JobOutput(job.key, files, job_row, rows, sorted(getattr(cache, "pending", ())))


def store_job(run: RunFolder, output: JobOutput, entries: Mapping[tuple[str, str], bytes] | None = None) -> None:
    """Write a job's images (atomically, before its rows) and commit its rows with its stage entries.

    ``entries``: the entry files' bytes when the job ran elsewhere; they are written into the run's cache first.
    Without them the entries are already in the run's cache, written there by :func:`compute_job`.
    """
    for path, data in output.files.items():
        run.write_file(path, data)
    if entries is not None:
        run.cache.pending.clear()
        for (stage, key), data in entries.items():
            run.cache.put(stage, key, data)
    run.commit([(output.job_row, output.rows)])


def finite_or_none(value: float | None) -> float | None:
    """NaN (a PIE-Bench region metric of an empty region, the reference's "nan") as SQL NULL; inf is kept."""
    return None if value is None or value != value else value


def edit_params(params: Mapping[str, Any], variant: Any) -> dict[str, Any]:
    """The job's parameters with each sweep parameter replaced by this edit's own value (``variant.params``,
    which :func:`~nonrigid.methods.run.run_edits` fills for every method, by parameter name)."""
    return {**params, **variant.params}
