"""Batching across images: every stage run for several images at once gives each image what its run alone gives.

Two checks, because two things could differ. With a denoiser that evaluates its batch row by row (so the model
itself cannot tell a batch from a single image), the batched stage code must give *bit-identical* results: this
checks the bookkeeping (per-image losses not divided by the batch, Adam over independent rows, NTI's per-image
early stop as a mask, each row's own unconditional embeddings while sampling). With the real batched UNet, results
differ only by the last bits of batched matrix products (~1e-6 per call); measured bounds on the tiny model are
asserted (Adam turns near-zero gradients into ~lr-sized steps whatever their size, so NTI's null embeddings move
by up to ~1e-3 where the inputs moved by 1e-6; the images stay within one grey level).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from nonrigid import edit
from nonrigid.api import only
from nonrigid.methods.run import EditRequest, run_edits
from nonrigid.mini.world import render_example
from nonrigid.models.registry import family_of
from nonrigid.models.sd import StableDiffusion
from nonrigid.stages.cache import StageCache
from nonrigid.stages.inversion import invert_images
from nonrigid.stages.sampling import sample_variants
from nonrigid.stages.text_optimization import TextJob, optimize_texts

TARGETS = ["a cat jumping", "a dog sitting", "a bird flying"]
SOURCES = ["a cat", "", "a bird"]
SEEDS = [3, 0, 1]
STEPS = 6
EARLY_STOP = 0.1  # on the tiny model: image 1 stops early at steps 0 and 1, the others at step 0 only


class RowByRow(torch.nn.Module):
    """The UNet evaluated one row at a time: a batch-invariant denoiser (slow; for checking bookkeeping)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, latents, timestep, encoder_hidden_states):
        timestep = torch.as_tensor(timestep)
        rows = []
        for r in range(latents.shape[0]):
            t = timestep[r : r + 1] if timestep.dim() and timestep.numel() > 1 else timestep
            rows.append(self.unet(latents[r : r + 1], t, encoder_hidden_states=encoder_hidden_states[r : r + 1]).sample)
        return SimpleNamespace(sample=torch.cat(rows))


@pytest.fixture(scope="module")
def images():
    return [render_example(seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def rowwise(tiny_pipe):
    return StableDiffusion(tiny_pipe, denoiser=RowByRow(tiny_pipe.unet))


def stops(losses: list[float]) -> list[bool]:
    """At which sampling steps NTI's inner loop ended early (its last loss under the step's threshold)."""
    return [loss < EARLY_STOP + i * 2e-5 for i, loss in enumerate(losses)]


def test_batched_stages_equal_single_runs_bit_for_bit_with_a_batch_invariant_denoiser(rowwise, images):
    jobs = [TextJob(image, prompt, seed) for image, prompt, seed in zip(images, TARGETS, SEEDS, strict=True)]
    batched_texts = optimize_texts(rowwise, jobs, steps=3, lr=1e-3)
    for job, batched in zip(jobs, batched_texts, strict=True):
        alone = only(optimize_texts(rowwise, [job], steps=3, lr=1e-3))
        assert torch.equal(batched.optimized_embedding, alone.optimized_embedding)
        assert batched.losses == alone.losses and batched.seed == job.seed

    batched_inversions = invert_images(rowwise, images, SOURCES, "nti", STEPS, inner_steps=5, early_stop=EARLY_STOP)
    patterns = []
    for image, source, batched in zip(images, SOURCES, batched_inversions, strict=True):
        alone = only(invert_images(rowwise, [image], [source], "nti", STEPS, inner_steps=5, early_stop=EARLY_STOP))
        for name in ("trajectory", "latent", "null_embeddings", "reconstruction", "source_embedding"):
            assert torch.equal(getattr(batched, name), getattr(alone, name)), name
        assert batched.losses == alone.losses
        patterns.append(stops(alone.losses))
    assert len({tuple(p) for p in patterns}) > 1, "the images must early-stop at different steps"

    texts = [[t] for t in batched_texts]
    batched_latents = sample_variants(rowwise, batched_inversions, texts, (0.0, 0.5), (1, 2), output_type="latent")
    for inversion, text, latents in zip(batched_inversions, texts, batched_latents, strict=True):
        alone = only(sample_variants(rowwise, [inversion], [text], (0.0, 0.5), (1, 2), output_type="latent"))
        assert torch.equal(latents, alone)


def test_ddim_and_npi_inversions_batched_equal_single_runs(rowwise, images):
    for method in ("ddim", "npi"):
        batched = invert_images(rowwise, images[:2], SOURCES[:2], method, 4)
        for image, source, result in zip(images[:2], SOURCES[:2], batched, strict=True):
            alone = only(invert_images(rowwise, [image], [source], method, 4))
            assert torch.equal(result.trajectory, alone.trajectory)
            assert (result.reconstruction is None) == (alone.reconstruction is None)
            if alone.reconstruction is not None:
                assert torch.equal(result.reconstruction, alone.reconstruction)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_edit_many_equals_each_edit_alone_with_the_real_unet_and_keys_the_cache_alike(tiny_pipe, images, tmp_path):
    params = {"num_steps": STEPS, "opt_steps": 4, "inner_steps": 5, "etas": (0.0, 0.5), "inject": (0.2,),
              "early_stop": EARLY_STOP}
    alone_cache, batch_cache = StageCache(tmp_path / "alone"), StageCache(tmp_path / "batch")
    alone = [edit(tiny_pipe, image, target, source_prompt=source, size=64, cache=alone_cache, seeds=(0, 1), **params)
             for image, target, source in zip(images, TARGETS, SOURCES, strict=True)]
    requests = [EditRequest(image, target, source) for image, target, source in zip(images, TARGETS, SOURCES,
                                                                                    strict=True)]
    model = family_of(tiny_pipe)

    def edit_many(cache):
        return run_edits(model, requests, "ours", params, seeds=(0, 1), size=64, cache=cache)

    batched = edit_many(batch_cache)

    for one, many in zip(alone, batched, strict=True):
        for a, b in zip(one.stages.text_optimizations, many.stages.text_optimizations, strict=True):
            assert a.seed == b.seed and max_diff(a.optimized_embedding, b.optimized_embedding) < 1e-5
        assert max_diff(one.stages.inversion.trajectory, many.stages.inversion.trajectory) < 1e-5
        assert stops(one.stages.inversion.losses) == stops(many.stages.inversion.losses)
        one_b, many_b = one.stages.inversion, many.stages.inversion
        assert max_diff(one_b.null_embeddings, many_b.null_embeddings) < 5e-3  # measured 1.2e-3
        assert max_diff(one_b.reconstruction, many_b.reconstruction) < 5e-4  # measured 1e-4
        assert [(v.seed, v.knobs) for v in one.variants] == [(v.seed, v.knobs) for v in many.variants]
        for a, b in zip(one.variants, many.variants, strict=True):
            pixels = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert pixels.max() <= 1 and (pixels > 0).mean() < 0.05  # one grey level at a few pixels at most

    def entries(cache):
        return sorted(p.relative_to(cache.root).as_posix() for p in cache.root.rglob("*.safetensors"))

    assert entries(batch_cache) == entries(alone_cache) and len(entries(alone_cache)) == 3 * 2 + 3

    # a second batch reads every stage back from the cache and samples the same images
    again = edit_many(batch_cache)
    for first, second in zip(batched, again, strict=True):
        assert second.cache == {"text_optimization": [0, 1], "inversion": True}
        assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first.variants, second.variants,
                                                                          strict=True))


# ---------------------------------------------------------------------------------------------- baselines across pairs

def test_dds_runs_batched_equal_each_run_alone_bit_for_bit_with_a_batch_invariant_denoiser(rowwise, images):
    from nonrigid.methods.dds import DDSJob, dds_optimize

    texts = {p: rowwise.encode_prompt(p) for p in set(TARGETS + SOURCES)}
    jobs = [DDSJob(rowwise.encode_image(image), texts[source], texts[target], seed)
            for image, target, source, seed in zip(images, TARGETS, SOURCES, SEEDS, strict=True)]
    batched = dds_optimize(rowwise, jobs, (0, 2, 5), lr=1.0)
    for job, many in zip(jobs, batched, strict=True):
        alone = only(dds_optimize(rowwise, [job], (0, 2, 5), lr=1.0))
        assert many.seed == job.seed and many.timesteps == alone.timesteps and many.losses == alone.losses
        assert sorted(many.snapshots) == [0, 2, 5]
        assert all(torch.equal(many.snapshots[n], alone.snapshots[n]) for n in (0, 2, 5))
        assert not torch.equal(many.snapshots[5], many.snapshots[0])  # the runs moved: the check has teeth
    assert len({tuple(r.timesteps) for r in batched}) == 3  # each run drew its own timesteps


def test_edit_friendly_inversions_and_samples_batched_equal_each_image_alone_bit_for_bit(rowwise, images):
    from nonrigid.methods.edit_friendly import edit_friendly_invert, edit_friendly_sample

    latents = [rowwise.encode_image(image) for image in images]
    sources = [rowwise.encode_prompt(p) for p in SOURCES]
    targets = [rowwise.encode_prompt(p) for p in TARGETS]
    seeds = [(0, 5), (1,), (2, 3)]
    batched = edit_friendly_invert(rowwise, latents, sources, seeds, STEPS, 3.5)
    finals = edit_friendly_sample(rowwise, [inv for mine in batched for inv in mine],
                                  [t for t, mine in zip(targets, batched, strict=True) for _ in mine], 7.5, (2, 4))
    finals = finals.split([2 * len(mine) for mine in batched])
    for latent, source, target, mine, many, final in zip(latents, sources, targets, seeds, batched, finals,
                                                         strict=True):
        alone = only(edit_friendly_invert(rowwise, [latent], [source], [mine], STEPS, 3.5))
        assert [inv.seed for inv in many] == list(mine)
        for a, b in zip(alone, many, strict=True):
            assert torch.equal(a.xs, b.xs) and torch.equal(a.zs, b.zs)
        assert torch.equal(edit_friendly_sample(rowwise, alone, target, 7.5, (2, 4)), final)
    assert not torch.equal(finals[0][0], finals[1][0])


@pytest.mark.parametrize("method", ["dds", "edit-friendly"])
def test_baselines_across_pairs_equal_each_pair_alone_with_the_real_unet(tiny_pipe, images, method):
    from nonrigid.methods.catalogue import method_info

    params = {"dds": {"iterations": (2, 6), "lr": 1.0}, "edit-friendly": {"num_steps": 8, "skip": (2, 5)}}[method]
    assert method_info(method).batches_images
    requests = [EditRequest(image, target, source) for image, target, source in zip(images, TARGETS, SOURCES,
                                                                                    strict=True)]
    model = family_of(tiny_pipe)
    many = run_edits(model, requests, method, params, seeds=(0, 1), size=64)
    for request, batched in zip(requests, many, strict=True):
        alone = only(run_edits(model, [request], method, params, seeds=(0, 1), size=64))
        assert [(v.seed, v.knobs) for v in batched.variants] == [(v.seed, v.knobs) for v in alone.variants]
        for a, b in zip(alone.variants, batched.variants, strict=True):
            pixels = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert pixels.max() <= 1 and (pixels > 0).mean() < 0.05
        assert batched.record.keys() == alone.record.keys()
    first, second = (np.asarray(r.variants[-1].image, dtype=int) for r in many[:2])
    assert np.abs(first - second).max() > 10  # different pictures, different edits


# ------------------------------------------------------------------------------------ nonrigid bench --pairs-per-batch

BENCH = ["--method", "ours", "--method", "nti", "--seeds", "2", "--sweep", "eta=0,0.5", "--set", "num_steps=3",
         "--set", "inner_steps=2", "--set", "opt_steps=2", "--limit", "3", "--model", "tiny", "--size", "64",
         "--metrics", "tiny", "--quiet"]
METRICS = ("clip_t", "lpips", "aesthetic")


def bench(tedbench, out, *extra) -> int:
    from nonrigid.cli import main

    return main(["bench", "--data", str(tedbench), "--out", str(out), *BENCH, *extra])


def test_bench_pairs_per_batch_gives_the_rows_and_images_of_one_pair_at_a_time(tedbench, tmp_path, monkeypatch):
    from nonrigid.evaluation.runfolder import VOLATILE_COLUMNS, done_job_keys, read_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert bench(tedbench, tmp_path / "one") == 0
    assert bench(tedbench, tmp_path / "two", "--pairs-per-batch", "2") == 0  # groups: pairs 0+1, then 2
    one, two = read_rows(tmp_path / "one"), read_rows(tmp_path / "two")
    assert done_job_keys(tmp_path / "one") == done_job_keys(tmp_path / "two") and len(one) == len(two) == 3 * 4 + 3
    key = lambda row: (row["job"], row["seed"], json.dumps(row["knobs"], sort_keys=True))  # noqa: E731
    two_by_key = {key(row): row for row in two}
    for row in one:
        other = two_by_key[key(row)]
        for column, value in row.items():
            if column in VOLATILE_COLUMNS or column in METRICS or column == "id":
                continue
            assert other[column] == value, column
        for metric in METRICS:
            if row.get(metric) is not None:
                assert other[metric] == pytest.approx(row[metric], abs=1e-3), metric
        a = np.asarray(Image.open(tmp_path / "one" / row["image"]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "two" / row["image"]), dtype=int)
        assert np.abs(a - b).max() <= 1
    # a rerun finds every job done, batched or not
    rows_before = read_rows(tmp_path / "two")
    assert bench(tedbench, tmp_path / "two", "--pairs-per-batch", "3") == 0
    assert read_rows(tmp_path / "two") == rows_before


def test_jobs_of_ours_and_dds_with_one_setting_are_grouped_n_pairs_at_a_time_and_others_run_alone(tedbench):
    from nonrigid.evaluation.bench import job_groups
    from nonrigid.evaluation.data import read_pairs
    from nonrigid.evaluation.plan import BenchSpec, plan_settings

    settings = plan_settings(["ours", "nti", "dds"], ["opt_steps=1,2"], ["num_steps=3"])
    spec = BenchSpec(tedbench, read_pairs(tedbench)[:3], settings, (0,), model="tiny", size=64)
    groups = [[(job.pair.index, job.method, job.setting.label) for job in group]
              for group in job_groups(spec.jobs(), 2)]
    p0, p1, p2 = (p.index for p in spec.pairs)
    assert groups == [
        [(p0, "ours", "opt_steps=1"), (p1, "ours", "opt_steps=1")],
        [(p0, "ours", "opt_steps=2"), (p1, "ours", "opt_steps=2")],
        [(p0, "nti", "default")], [(p0, "dds", "default"), (p1, "dds", "default")], [(p1, "nti", "default")],
        [(p2, "ours", "opt_steps=1")], [(p2, "ours", "opt_steps=2")], [(p2, "nti", "default")],
        [(p2, "dds", "default")],
    ]
    assert [len(g) for g in job_groups(spec.jobs(), 1)] == [1] * 12


def test_bench_refuses_a_pairs_per_batch_below_one(tedbench, tmp_path, capsys):
    assert bench(tedbench, tmp_path / "run", "--pairs-per-batch", "0") != 0
    assert "--pairs-per-batch must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- nonrigid mini evaluate


def test_mini_evaluation_in_batches_of_pairs_gives_the_rows_of_one_pair_at_a_time(tmp_path, model):
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import evaluate
    from nonrigid.mini.judge import load_judge
    from nonrigid.mini.protocol import Protocol

    write_dataset(tmp_path / "data", count=3, edits_per_image=1, seed=3)
    pairs, judge = read_dataset(tmp_path / "data"), load_judge()
    protocol = Protocol(num_steps=3, opt_steps=1, ablation_etas=(0.0, 1.0))  # every group, fewer ablation samples
    runs = {n: evaluate(family_of(model), judge, pairs, tmp_path / f"run{n}", baselines=(), progress=False,
                        pairs_per_batch=n, protocol=protocol) for n in (1, 2)}
    assert len(runs[1]) == len(runs[2]) > 3 * 20
    for one, two in zip(runs[1], runs[2], strict=True):
        assert one.keys() == two.keys()
        for column, value in one.items():
            assert two[column] == (pytest.approx(value, abs=1e-3) if isinstance(value, float) else value), column
    for index in range(3):
        a = np.asarray(Image.open(tmp_path / "run1" / "results" / f"{index:03d}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "run2" / "results" / f"{index:03d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_mini_evaluation_batches_the_baselines_across_pairs_with_the_rows_of_one_pair_at_a_time(tmp_path, model,
                                                                                                 monkeypatch):
    """The baselines that batch across images (DDS, Edit-friendly) run a batch of pairs as one model batch, the
    others one by one: every row as at one pair per batch; an interrupted run redoes only the missing job."""
    from nonrigid.mini import protocol as mini_protocol
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import evaluate
    from nonrigid.mini.judge import load_judge

    for method, params in {"dds": {"iterations": (2, 8)}, "edit-friendly": {"num_steps": 6, "skip": (2, 4)},
                           "masactrl": {"num_steps": 4, "inner_steps": 2, "start_step": (1, 3)}}.items():
        monkeypatch.setitem(mini_protocol.BASELINES, method, params)
    write_dataset(tmp_path / "data", count=3, edits_per_image=1, seed=3)
    pairs, judge = read_dataset(tmp_path / "data"), load_judge()
    protocol = mini_protocol.Protocol(num_steps=3, opt_steps=1, etas=(1.0,), ablation_etas=(1.0,), ablations=False)
    methods = ("dds", "edit-friendly", "masactrl")
    runs = {n: evaluate(family_of(model), judge, pairs, tmp_path / f"run{n}", baselines=methods, progress=False,
                        pairs_per_batch=n, protocol=protocol) for n in (1, 3)}
    baseline_rows = {n: [r for r in rows if r["setting"] in methods] for n, rows in runs.items()}
    assert len(baseline_rows[1]) == len(baseline_rows[3]) == 3 * 2 * 3
    for one, three in zip(baseline_rows[1], baseline_rows[3], strict=True):
        assert one.keys() == three.keys()
        for column, value in one.items():
            assert three[column] == (pytest.approx(value, abs=1e-3) if isinstance(value, float) else value), column
    assert len({r["identity_error"] for r in baseline_rows[3] if r["setting"] == "dds"}) == 6  # pairs differ

    folder = tmp_path / "run3" / "baselines"
    written = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    lost = json.loads((folder / "001-dds.json").read_text())
    (folder / "001-dds.json").unlink()
    evaluate(family_of(model), judge, pairs, tmp_path / "run3", baselines=methods, progress=False, pairs_per_batch=3,
             protocol=protocol)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json") if p.name != "001-dds.json"} == \
        {name: ns for name, ns in written.items() if name != "001-dds.json"}  # nothing else was redone
    redone = json.loads((folder / "001-dds.json").read_text())
    assert [r["identity_error"] for r in redone] == pytest.approx([r["identity_error"] for r in lost], abs=1e-3)
