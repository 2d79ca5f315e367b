"""The benchmark: every (pair, method, setting) of a TEdBench- or PIE-Bench-layout folder, resumable, one SQLite row
per edit (PIE-Bench pairs, which carry a mask, also get PIE-Bench's metric columns).

:mod:`.plan` says what a run computes (settings, jobs, :class:`~.plan.BenchSpec`), :mod:`.runfolder` where and how
it is stored; this module runs the jobs a run folder does not hold yet. The benchmark knows no method and no
dataset by name: every method is run through :func:`~nonrigid.methods.run.run_method`, and each edit's
parameters are the job's with the variant's own sweep values (``MethodVariant.params``). Torch-free at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
    pipe: Any,
    metrics: Any,
    *,
    progress: bool = False,
    pairs_per_batch: int = 1,
) -> BenchStats:
    """Run every job of ``spec`` that ``run`` does not hold yet, committing each when its images are on disk.

    ``pairs_per_batch`` > 1: pending jobs of a method that batches across images (ours), with the same setting
    and seeds, run ``pairs_per_batch`` pairs at a time as one model batch (:func:`job_groups`); each job is still
    saved, scored and committed on its own, and its results equal its run alone up to the last bits of batched
    products. A job's seconds are then its share of its batch."""
    from tqdm.auto import tqdm

    if pairs_per_batch < 1:
        raise UsageError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    jobs = spec.jobs()
    todo = pending_jobs(spec, run)
    stats = BenchStats(jobs=len(jobs), done_before=len(jobs) - len(todo))
    bar = tqdm(total=len(jobs), initial=stats.done_before, desc="bench", unit="job", disable=not progress)
    with bar:
        for group in job_groups(todo, pairs_per_batch):
            first = group[0]
            more = f" +{len(group) - 1} pairs" if len(group) > 1 else ""
            bar.set_postfix_str(f"{first.pair.slug}{more} {first.method} {first.setting.label}"[:60])
            for job, result in zip(group, edit_jobs(group, spec, run, pipe), strict=True):
                stats.edits += record_job(job, result, run, metrics)
                stats.ran += 1
                bar.update(1)
    return stats


def job_groups(todo: list[Job], pairs_per_batch: int) -> list[list[Job]]:
    """Jobs in the order they run: jobs of a method that batches across images, with the same setting and seeds,
    gathered ``pairs_per_batch`` at a time (a group runs where its first job stood); every other job alone."""
    from ..methods.run import batches_pairs

    groups: list[list[Job]] = []
    open_groups: dict[tuple, list[Job]] = {}
    for job in todo:
        if pairs_per_batch == 1 or not batches_pairs(job.method):
            groups.append([job])
            continue
        key = (job.method, job.setting.slug, job.seeds)
        group = open_groups.get(key)
        if group is None or len(group) == pairs_per_batch:
            group = open_groups[key] = []
            groups.append(group)
        group.append(job)
    return groups


def edit_jobs(group: list[Job], spec: BenchSpec, run: RunFolder, pipe: Any) -> list[Any]:
    """The edits of jobs that share method, setting and seeds, as one call (one model batch where the method can).
    The stage entries they write are committed with the group's first job."""
    from ..methods.run import EditRequest, run_method_many

    run.cache.pending.clear()  # stage entries of a job that failed before this one in this process do not count
    first = group[0]
    requests = [EditRequest(job.pair.image, job.pair.target_text, job.source_prompt) for job in group]
    return run_method_many(
        pipe, requests, first.method, first.setting.params, seeds=first.seeds, size=spec.size, cache=run.cache,
        batch_size=spec.runtime.get("batch_size"),
    )


def record_job(job: Job, result: Any, run: RunFolder, metrics: Any) -> int:
    """Save a job's images, score them, commit its rows (one transaction); returns the number of edits."""
    from ..methods.output import variant_filename

    input_path = f"inputs/{job.pair.slug}.png"
    run.write_image(input_path, result.input_image)
    paths = [f"{job.folder}/{variant_filename(v.seed, v.knobs)}" for v in result.variants]
    if len(set(paths)) != len(paths):
        raise UsageError(f"{job.method}: two variants of one job got the same file name; give distinct sweep values")
    for path, variant in zip(paths, result.variants, strict=True):
        run.write_image(path, variant.image)
    count = len(result.variants)
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
            "image": path, "record": {**variant.record, "input": input_path},
            "job_seconds": total, "seconds_per_edit": total / count, "timings": timings, "cache": result.cache,
        })
    job_row = {"job": job.key, "pair": job.pair.index, "method": job.method, "setting": job.setting.label,
               "params": result.params, "edits": count, "seconds": total, "timings": timings,
               "cache": result.cache, "record": result.record}
    run.commit([(job_row, rows)])
    return count


def finite_or_none(value: float | None) -> float | None:
    """NaN (a PIE-Bench region metric of an empty region, the reference's "nan") as SQL NULL; inf is kept."""
    return None if value is None or value != value else value


def edit_params(params: Mapping[str, Any], variant: Any) -> dict[str, Any]:
    """The job's parameters with each sweep parameter replaced by this edit's own value (``variant.params``,
    which :func:`~nonrigid.methods.run.run_method` fills for every method, by parameter name)."""
    return {**params, **variant.params}
