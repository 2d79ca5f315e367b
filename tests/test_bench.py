"""The benchmark: planning, a real run over TEdBench pairs, SIGKILL and resume, refusal of a changed command, and
scoring of edits made elsewhere. Tiny random model at 64 px, tiny random metric backbones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from nonrigid.cli import main
from nonrigid.errors import UsageError
from nonrigid.evaluation.data import Pair, caption_from_filename, read_pairs, select_pairs
from nonrigid.evaluation.plan import plan_settings
from nonrigid.evaluation.runfolder import DATABASE_FILE, VOLATILE_COLUMNS, done_job_keys, read_rows
from nonrigid.evaluation.score import match_edits

# 2 pairs x 2 seeds x 2 settings (opt_steps) x 2 etas for ours, plus nti (deterministic: one edit per pair)
BENCH = ["--method", "ours", "--method", "nti", "--seeds", "2", "--sweep", "eta=0,0.5", "--sweep", "opt_steps=1,2",
         "--set", "num_steps=3", "--set", "inner_steps=1", "--limit", "2", "--model", "tiny", "--size", "64",
         "--metrics", "tiny", "--quiet"]
JOBS = 2 * 2 + 2  # per pair: ours x 2 settings, nti x 1
EDITS = 2 * 2 * 2 * 2 + 2


def cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NONRIGID_CACHE_DIR": str(cwd / "cache")}
    return [sys.executable, "-m", "nonrigid.cli", *args], {"cwd": cwd, "env": env}


def stable(rows):
    """Rows without what may differ between two runs of one command (timings, cache hits)."""
    return [{k: v for k, v in row.items() if k not in VOLATILE_COLUMNS} for row in rows]


def image_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for folder in ("images", "inputs")
            for p in sorted((run / folder).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------- planning


def test_sweep_parameters_stay_in_one_job_and_other_sweeps_multiply_jobs():
    plan = plan_settings(["ours", "nti"], ["eta=0,0.5", "K=0.1,0.2", "opt_steps=1,2"], ["num_steps=3"])
    ours, nti = plan["ours"], plan["nti"]
    assert [s.label for s in ours] == ["opt_steps=1", "opt_steps=2"]
    for setting, steps in zip(ours, (1, 2), strict=True):  # labels (eta, K) name the sweep parameters
        assert setting.params == {"num_steps": 3, "etas": (0.0, 0.5), "inject": (0.1, 0.2), "opt_steps": steps}
        assert setting.source == "none"
    assert [(s.label, s.params) for s in nti] == [("default", {"num_steps": 3})]  # what nti lacks is not applied

    grid = plan_settings(["ours"], ["inversion=ddim,nti", "source=none,pair"])["ours"]
    assert [(s.label, s.params["inversion"], s.source) for s in grid] == [
        ("inversion=ddim source=none", "ddim", "none"), ("inversion=ddim source=pair", "ddim", "pair"),
        ("inversion=nti source=none", "nti", "none"), ("inversion=nti source=pair", "nti", "pair")]
    assert plan_settings(["ours", "nti"], [], ["ours.num_steps=7"])["nti"][0].params == {}


def test_presets_are_the_papers_ablations():
    inversion = plan_settings(["ours"], ["eta=0.2"], [], preset="inversion")["ours"]
    assert [(s.label, s.params["inversion"], s.source) for s in inversion] == [
        ("DDIM", "ddim", "none"), ("NTI-src", "nti", "pair"), ("NTI-w/o-src", "nti", "none")]
    (injection,) = plan_settings(["ours"], [], [], preset="injection")["ours"]
    assert injection.params["inject"] == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


@pytest.mark.parametrize(("sweeps", "sets", "preset", "message"), [
    (["alpha=1"], [], None, "no parameter of that name"),
    (["eta=0,2"], [], None, "must be <= 1"),
    (["opt_steps=1"], ["opt_steps=2"], None, "both --sweep and --set"),
    (["eta"], [], None, "key=value"),
    ([], ["source=caption"], None, "source must be one of"),
    ([], ["inversion=ddim"], "inversion", "preset sets inversion itself"),
])
def test_bad_plans_are_refused_in_one_line(sweeps, sets, preset, message):
    with pytest.raises(UsageError, match=message) as err:
        plan_settings(["ours", "nti"], sweeps, sets, preset)
    assert "\n" not in str(err.value)


def test_pairs_are_read_and_selected_by_index_range_or_image(tedbench):
    pairs = read_pairs(tedbench)
    assert len(pairs) == 100 and pairs[5].img_name == "tennis_ball.jpeg" and pairs[5].index == 5
    assert pairs[0].source_text == "A photo of dog standing."  # TEdBench has no captions: one from the file name
    chosen = select_pairs(pairs, "8-9,zebra,0", limit=3)
    assert [p.index for p in chosen] == [0, 6, 8]
    with pytest.raises(UsageError, match="numbered 0-99"):
        select_pairs(pairs, "99-100")
    assert caption_from_filename("bird-g83440b9c4_1920.jpg") == "A photo of bird."
    assert caption_from_filename("two_dogs_with_checkered_shirts1.jpg") == "A photo of two dogs with checkered shirts."


def test_outside_edits_are_matched_to_pairs_whatever_their_spelling(tmp_path):
    pairs = [Pair(0, "bird-g83440b9c4_1920.jpg", Path("x"), "Two kissing parrots."),
             Pair(1, "bird.jpeg", Path("x"), "A photo of a bird spreading wings."),
             Pair(2, "door.jpeg", Path("x"), "A photo of a door for room number 17."),
             Pair(3, "bird.png", Path("x"), "A photo of a bird spreading wings.")]
    names = ["bird-g83440b9c4_1920.jpg-Two_kissing_parrots.png",  # TEdBench's published Imagic naming
             "bird.jpeg-A photo of a bird spreading wings.png",  # spaces, as one of its files has
             "BIRD.PNG - a photo of a bird, spreading wings_2.png",  # case, punctuation, a seed suffix
             "door.jpeg-A_photo_of_a_door_for_room_number_17.png",  # a number that belongs to the text
             "bird-A photo of a bird spreading wings.png",  # no extension: bird.jpeg or bird.png?
             "zebra.jpeg-A_photo_of_a_horse.png"]
    matches, warnings = match_edits([tmp_path / n for n in names], pairs)
    assert sorted((m.file.name, m.pair.index, m.seed) for m in matches) == sorted([
        (names[0], 0, 0), (names[1], 1, 0), (names[2], 3, 2), (names[3], 2, 0)])
    assert sorted(w.split(":")[0] for w in warnings) == sorted([names[4], names[5]])


# --------------------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def runs(tedbench, tmp_path_factory):
    """A clean run, and the same command SIGKILLed (in a subprocess) once its first job is in, then run again.

    The clean run and the rerun run in this process (one thread, like the subprocess), which saves two imports of
    torch; the kill happens from a thread that watches the victim's database meanwhile.
    """
    root = tmp_path_factory.mktemp("bench")
    clean_args = ["bench", "--data", str(tedbench), "--out", str(root / "clean"), *BENCH]
    killed_args = ["bench", "--data", str(tedbench), "--out", str(root / "killed"), *BENCH]
    command, options = cli(killed_args, root)
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **options)
    killed_rows: list[dict] = []

    def kill_after_first_job() -> None:
        deadline = time.monotonic() + 500
        while not done_job_keys(root / "killed") and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_rows.extend(read_rows(root / "killed"))

    watcher = threading.Thread(target=kill_after_first_job)
    watcher.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(clean_args) == 0
        watcher.join()
        assert victim.returncode == -signal.SIGKILL, victim.stderr.read()
        assert main(killed_args) == 0
    finally:
        torch.set_num_threads(threads)
        if victim.poll() is None:
            victim.kill()
    return {"root": root, "clean": root / "clean", "killed": root / "killed", "killed_rows": killed_rows,
            "args": killed_args}


def test_a_run_stores_one_row_per_edit_with_its_image_parameters_and_metrics(runs, tedbench):
    from nonrigid.evaluation.metrics import Metrics
    from nonrigid.images import load_image

    run = runs["clean"]
    rows = read_rows(run)
    assert len(rows) == EDITS
    assert len({(r["job"], r["seed"], json.dumps(r["knobs"])) for r in rows}) == EDITS
    ours = [r for r in rows if r["method"] == "ours"]
    assert sorted({(r["pair"], r["setting"], r["seed"], r["knobs"]["eta"]) for r in ours}) == sorted(
        (pair, f"opt_steps={steps}", seed, eta) for pair in (0, 1) for steps in (1, 2) for seed in (0, 1)
        for eta in (0.0, 0.5))
    for row in ours:  # every parameter, with this edit's own sweep values
        assert row["params"]["etas"] == row["knobs"]["eta"] and row["params"]["inject"] == 0.2
        assert row["params"]["opt_steps"] == int(row["setting"].split("=")[1]) and row["params"]["num_steps"] == 3
        assert row["knobs"]["K"] == 1  # round(0.2 x 3)
    nti = [r for r in rows if r["method"] == "nti"]
    assert [(r["pair"], r["seed"]) for r in nti] == [(0, 0), (1, 0)]  # deterministic: once, not per seed
    inputs = json.loads((tedbench / "input_list.json").read_text())
    metrics = Metrics.tiny()
    for row in rows:
        assert row["target_text"] == inputs[row["pair"]]["target_text"] and row["source_prompt"] == ""
        edited = Image.open(run / row["image"])
        assert edited.size == (64, 64)
        assert row["seconds_per_edit"] > 0 and row["timings"]["total"] == pytest.approx(row["job_seconds"])
    source = Image.open(run / rows[0]["record"]["input"]).convert("RGB")
    assert source.tobytes() == load_image(tedbench / "originals" / inputs[0]["img_name"], 64).tobytes()
    for row in rows[:3] + nti:  # the stored metrics are the metrics of the stored images
        score = metrics.score(Image.open(run / row["record"]["input"]).convert("RGB"),
                              Image.open(run / row["image"]).convert("RGB"), row["target_text"])
        assert [row["clip_t"], row["lpips"], row["aesthetic"]] == pytest.approx(
            [score["clip_t"], score["lpips"], score["aesthetic"]], rel=1e-4, abs=1e-6)
    assert len({r["image"] for r in rows}) == EDITS


def test_a_killed_run_resumed_ends_with_exactly_the_rows_and_images_of_a_clean_run(runs):
    killed_rows = runs["killed_rows"]
    assert 0 < len(killed_rows) < EDITS, "the kill should land part-way"
    jobs_done = {r["job"] for r in killed_rows}
    assert len(jobs_done) < JOBS
    for row in killed_rows:  # no row without its image
        assert (runs["killed"] / row["image"]).is_file()

    clean_rows, resumed_rows = read_rows(runs["clean"]), read_rows(runs["killed"])
    assert stable(resumed_rows) == stable(clean_rows)  # same ids too: no duplicates, no gaps
    assert stable(resumed_rows[: len(killed_rows)]) == stable(killed_rows)  # finished jobs were not redone
    assert [r["created_at"] for r in resumed_rows[: len(killed_rows)]] == [r["created_at"] for r in killed_rows]
    assert image_files(runs["killed"]) == image_files(runs["clean"])  # byte for byte, no leftovers


def test_the_same_command_again_does_nothing_and_a_changed_one_is_refused(runs, capsys):
    before = read_rows(runs["clean"])
    args = ["bench", "--data", runs["args"][2], "--out", str(runs["clean"]), *BENCH]
    capsys.readouterr()
    assert main([a for a in args if a != "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"all {JOBS} jobs are done" in captured.err and "loading model" not in captured.err
    assert captured.out.strip() == str(runs["clean"])
    assert read_rows(runs["clean"]) == before

    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2 pairs, seeds 0, 1",
        "  ours [opt_steps=1]: num_steps=3 inner_steps=1 etas=0,0.5 opt_steps=1",
        "  ours [opt_steps=2]: num_steps=3 inner_steps=1 etas=0,0.5 opt_steps=2",
        "  nti [default]: num_steps=3 inner_steps=1",
        f"{JOBS} jobs, {EDITS} edits; {JOBS} jobs done in {runs['clean']}"]

    assert main([*args, "--seeds", "3"]) == 2  # a later --seeds wins in argparse
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs in: seeds" in err
    assert main([*args, "--sweep", "inner_steps=1,2"]) == 2
    assert read_rows(runs["clean"]) == before
    with sqlite3.connect(runs["clean"] / DATABASE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (JOBS,)


def test_a_run_folder_is_used_by_one_process_at_a_time(tmp_path):
    from nonrigid.evaluation.runfolder import opened

    with opened(tmp_path / "run", {"kind": "test"}), pytest.raises(UsageError, match="in use by another"):
        opened(tmp_path / "run", {"kind": "test"}).__enter__()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds no run\.json"):
        opened(tmp_path / "other", {"kind": "test"}).__enter__()


# --------------------------------------------------------------------------------------------------- score


def test_outside_edits_are_scored_into_the_same_kind_of_database(runs, tedbench, tmp_path, capsys):
    from nonrigid.evaluation.metrics import Metrics
    from nonrigid.images import load_image

    rows = [r for r in read_rows(runs["clean"]) if r["method"] == "ours" and r["knobs"]["eta"] == 0.5
            and r["setting"] == "opt_steps=2"]
    outside = tmp_path / "imagic"
    outside.mkdir()
    for row in rows:  # published results are bigger than the working size; the scorer resizes them
        name = f"{row['image_name']}-{row['target_text'].rstrip('.').replace(' ', '_')}_{row['seed']}.png"
        Image.open(runs["clean"] / row["image"]).resize((96, 96)).save(outside / name)
    (outside / "notes-about-this.png").write_bytes((outside / name).read_bytes())

    out = tmp_path / "scored"
    code = main(["score", str(outside), "--data", str(tedbench), "--out", str(out), "--size", "64",
                     "--metrics", "tiny", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out)
    assert "notes-about-this.png: matches no pair" in captured.err
    scored = read_rows(out)
    assert sorted((r["pair"], r["seed"]) for r in scored) == sorted((r["pair"], r["seed"]) for r in rows)
    metrics = Metrics.tiny()
    for row in scored:
        assert row["method"] == "imagic" and row["seconds_per_edit"] is None
        source = load_image(tedbench / "originals" / row["image_name"], 64)
        edited = load_image(outside / row["record"]["file"], 64)
        assert Image.open(out / row["image"]).tobytes() == edited.tobytes()
        score = metrics.score(source, edited, row["target_text"])
        assert [row["clip_t"], row["lpips"], row["aesthetic"]] == pytest.approx(
            [score["clip_t"], score["lpips"], score["aesthetic"]], rel=1e-5, abs=1e-7)

    assert main(["score", str(outside), "--data", str(tedbench), "--out", str(out), "--size", "64",
                     "--metrics", "tiny", "--quiet"]) == 0
    assert read_rows(out) == scored  # scored files are not scored twice
    shutil.rmtree(outside)


def test_a_decompression_bomb_among_the_images_is_refused_in_one_line_before_any_job(tmp_path, capsys):
    """In a TEdBench folder, a PIE-Bench folder or a folder of edits to score: exit 2, the project's size message,
    and nothing run or written (no model, no metrics, no run folder)."""
    from conftest import write_bomb_png

    tedbench_like = tmp_path / "tedbench"
    (tedbench_like / "originals").mkdir(parents=True)
    for name in ("cat.png", "dog.png"):
        Image.new("RGB", (64, 64)).save(tedbench_like / "originals" / name)
    listing = [{"img_name": "cat.png", "target_text": "a photo of a sitting cat"},
               {"img_name": "dog.png", "target_text": "a photo of a jumping dog"}]
    (tedbench_like / "input_list.json").write_text(json.dumps(listing))
    with_bomb = tmp_path / "with-bomb"
    shutil.copytree(tedbench_like, with_bomb)
    write_bomb_png(with_bomb / "originals" / "dog.png")  # its header claims 20,000 x 20,000 px
    pie_like = tmp_path / "piebench"
    (pie_like / "annotation_images" / "5_pose").mkdir(parents=True)
    write_bomb_png(pie_like / "annotation_images" / "5_pose" / "1.png")
    (pie_like / "mapping_file.json").write_text(json.dumps({"1": {
        "image_path": "5_pose/1.png", "original_prompt": "a dog", "editing_prompt": "a [jumping] dog",
        "editing_type_id": "5", "mask": [0, 10]}}))
    edits = tmp_path / "edits"
    edits.mkdir()
    write_bomb_png(edits / "dog.png-a photo of a jumping dog.png")

    commands = {
        "bench": ["bench", "--data", str(with_bomb), "--out", str(tmp_path / "run"), "--model", "tiny"],
        "piebench": ["bench", "--data", str(pie_like), "--out", str(tmp_path / "pie-run"), "--model", "tiny"],
        "score": ["score", str(edits), "--data", str(tedbench_like), "--out", str(tmp_path / "scored"),
                  "--metrics", "tiny"],
    }
    for name, args in commands.items():
        assert main([*args, "--quiet"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("nonrigid: error: image ") and err.endswith(
            ".png is over 10,000 px a side; images up to 10,000 px a side are accepted"), (name, err)
        assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits", "piebench", "tedbench", "with-bomb"]


# --------------------------------------------------------------------------------------------------- flags


def test_steps_is_set_num_steps_and_not_both(runs, tmp_path, capsys):
    """``--steps 3`` is ``--set num_steps=3``: the clean run (made with --set) counts as done; both are refused."""
    at = BENCH.index("num_steps=3")
    with_steps = [*BENCH[: at - 1], "--steps", "3", *BENCH[at + 1 :]]
    args = ["bench", "--data", runs["args"][2], "--out", str(runs["clean"]), *with_steps]
    capsys.readouterr()
    assert main([a for a in args if a != "--quiet"]) == 0
    assert f"all {JOBS} jobs are done" in capsys.readouterr().err

    fresh = ["bench", "--data", runs["args"][2], "--out", str(tmp_path / "plan"), *with_steps, "--steps", "5",
             "--dry-run"]
    assert main(fresh) == 0
    assert "  nti [default]: num_steps=5 inner_steps=1" in capsys.readouterr().out.splitlines()

    assert main([*args, "--set", "num_steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps" in err and "num_steps" in err


def test_cache_dir_holds_the_runs_stage_cache(tedbench, tmp_path, capsys):
    """With --cache-dir the stages are cached there (and read back by later jobs of the pair), not in OUT/cache."""
    run, cache = tmp_path / "run", tmp_path / "stages"
    args = ["bench", "--data", str(tedbench), "--out", str(run), "--cache-dir", str(cache), "--method", "ours",
            "--sweep", "opt_steps=1,2", "--set", "num_steps=3", "--set", "inner_steps=1", "--set", "eta=0",
            "--limit", "1", "--model", "tiny", "--size", "64", "--metrics", "tiny", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    assert [p for p in cache.rglob("*") if p.is_file()], "no stage was cached in --cache-dir"
    assert not [p for p in (run / "cache").rglob("*") if p.is_file()]
    with sqlite3.connect(run / DATABASE_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM stage_entries").fetchone()[0] > 0
        assert json.loads(db.execute("SELECT value FROM meta WHERE key = 'cache_dir'").fetchone()[0]) == str(cache)
    second = [r for r in read_rows(run) if r["setting"] == "opt_steps=2"]
    assert second and any(second[0]["cache"].values()), "the second job did not reuse the first job's stages"


def test_the_knob_flags_of_edit_are_set_assignments_in_bench(tedbench, tmp_path, capsys):
    """`nonrigid bench --eta 0 1 --opt-steps 2 --inversion ddim` plans exactly what the --set spelling plans."""
    common = ["bench", "--data", str(tedbench), "--limit", "1", "--model", "tiny", "--metrics", "tiny",
              "--dry-run", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a"), "--eta", "0", "1", "--opt-steps", "2",
                 "--inversion", "ddim"]) == 0
    by_flags = capsys.readouterr().out.splitlines()[1]
    assert main([*common, "--out", str(tmp_path / "b"), "--set", "etas=0,1", "--set", "opt_steps=2",
                 "--set", "inversion=ddim"]) == 0
    by_set = capsys.readouterr().out.splitlines()[1]
    assert by_flags == by_set and "etas=0,1" in by_flags and "inversion=ddim" in by_flags
    assert main([*common, "--out", str(tmp_path / "c"), "--eta", "0", "--sweep", "eta=0,0.5"]) == 2
    assert "--eta and --sweep eta both set etas" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "d"), "--method", "dds", "--eta", "0"]) == 2
    assert "--eta does not apply to dds" in capsys.readouterr().err


def test_bench_works_at_the_models_native_size_as_edit_does(tedbench, tmp_path, capsys):
    """Without --size both commands take the model's native size (96 px for tiny-sd2-v), not a fixed 512."""
    out = tmp_path / "run"
    assert main(["bench", "--data", str(tedbench), "--limit", "1", "--method", "nti", "--model", "tiny-sd2-v",
                 "--set", "num_steps=2", "--set", "inner_steps=1", "--metrics", "tiny", "--out", str(out),
                 "--quiet"]) == 0, capsys.readouterr().err
    (row,) = read_rows(out)
    assert Image.open(out / row["image"]).size == Image.open(out / row["record"]["input"]).size == (96, 96)
    assert json.loads((out / "run.json").read_text())["config"]["size"] is None  # the model's own, whatever it is
    # a run folder resumed with another size (e.g. one made when 512 was the default) says which size it holds
    assert main(["bench", "--data", str(tedbench), "--limit", "1", "--method", "nti", "--model", "tiny-sd2-v",
                 "--set", "num_steps=2", "--set", "inner_steps=1", "--metrics", "tiny", "--out", str(out),
                 "--size", "512", "--quiet"]) == 2
    assert "differs in: size (unset in the run, 512 now)" in capsys.readouterr().err
    pair = read_pairs(tedbench)[0]
    assert main(["edit", str(pair.image), pair.target_text, "--method", "nti", "--model", "tiny-sd2-v", "--steps", "2",
                 "--inner-steps", "1", "--out", str(tmp_path / "edit"), "--no-cache", "--quiet"]) == 0
    assert Image.open(tmp_path / "edit" / "input.png").size == (96, 96)


def test_low_memory_batch_size_reaches_the_jobs(tedbench, tmp_path, monkeypatch):
    """``--low-memory`` without ``--batch-size`` samples LOW_MEMORY_BATCH_SIZE variants at a time in every job (the
    spec the jobs read, and the run's stored identity); an explicit ``--batch-size`` wins."""
    import nonrigid.cli.bench as bench_cli
    from nonrigid.cli.common import LOW_MEMORY_BATCH_SIZE
    from nonrigid.evaluation.bench import BenchStats

    seen = []
    monkeypatch.setattr(bench_cli, "run_serially",
                        lambda args, spec, run, piebench=False: seen.append(spec.runtime) or BenchStats())
    common = ["bench", "--data", str(tedbench), "--limit", "1", "--model", "tiny", "--metrics", "tiny", "--quiet",
              "--low-memory"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--batch-size", "3"]) == 0
    assert [r["batch_size"] for r in seen] == [LOW_MEMORY_BATCH_SIZE, 3]
    assert all(r["low_memory"] for r in seen)
