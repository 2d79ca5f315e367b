"""The benchmark on Ray: a local Ray instance on 127.0.0.1 with two one-core workers, the tiny model and tiny
metrics. Rows and images equal a serial run's; a worker SIGKILLed mid-job and a driver SIGKILLed mid-run both
end with every row exactly once; without Ray, ``--ray`` is a one-line error naming the extra."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nonrigid.cli import main
from nonrigid.errors import UsageError
from nonrigid.evaluation.distributed import KILL_FILE_ENV, Groups, worker_plan
from nonrigid.evaluation.runfolder import DATABASE_FILE, done_job_keys, read_rows

# pairs 5, 6: one image each; 8, 9: the same bird (a group: nti reuses ours' inversion, in serial order)
BENCH = ["--method", "ours", "--method", "nti", "--pairs", "5,6,8,9", "--seeds", "2", "--sweep", "eta=0,0.5",
         "--set", "num_steps=3", "--set", "inner_steps=1", "--set", "opt_steps=2", "--model", "tiny", "--size", "64",
         "--metrics", "tiny", "--quiet"]
JOBS = 4 * 2
EDITS = 4 * (2 * 2 + 1)
TIMES = ("id", "job_seconds", "seconds_per_edit", "timings", "created_at")  # all else, cache hits too, must match


def comparable(run: Path) -> list[dict]:
    """A run's rows without ids and times, in job order (workers finish in any order)."""
    rows = [{k: v for k, v in row.items() if k not in TIMES} for row in read_rows(run)]
    return sorted(rows, key=lambda r: r["image"])


def files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for folder in ("images", "inputs")
            for p in sorted((run / folder).rglob("*")) if p.is_file()}


def stage_entries(run: Path) -> set[tuple]:
    with sqlite3.connect(run / DATABASE_FILE) as db:
        return set(db.execute("SELECT stage, key, job FROM stage_entries"))


def meta(run: Path, key: str):
    with sqlite3.connect(run / DATABASE_FILE) as db:
        return json.loads(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


def bench(tedbench: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--data", str(tedbench), "--out", str(out), *BENCH, *extra]


def in_one_thread(args: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each one-core worker runs: the same arithmetic
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance (two CPUs, 127.0.0.1) for the module; a driver in this process reuses it, one in a
    subprocess joins it by its address. Workers read the kill hook's file name from the environment Ray starts
    them with, so it is set first."""
    ray = pytest.importorskip("ray")
    from nonrigid.evaluation.distributed import connect

    root = tmp_path_factory.mktemp("ray")
    kill_file = root / "kill-a-worker"
    previous = os.environ.get(KILL_FILE_ENV)
    os.environ[KILL_FILE_ENV] = str(kill_file)
    assert connect("local", num_cpus=2)
    try:
        yield {"root": root, "kill_file": kill_file, "address": ray.get_runtime_context().gcs_address}
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(KILL_FILE_ENV, None)
        else:
            os.environ[KILL_FILE_ENV] = previous


@pytest.fixture(scope="module")
def serial(cluster, tedbench):
    out = cluster["root"] / "serial"
    assert in_one_thread(bench(tedbench, out)) == 0
    return out


def test_a_ray_run_stores_the_rows_and_images_of_a_serial_run(cluster, serial, tedbench):
    import ray

    out = cluster["root"] / "ray"
    assert ray.cluster_resources()["CPU"] == 2
    assert main(bench(tedbench, out, "--ray")) == 0
    assert meta(out, "workers") == 2  # one per core
    assert meta(out, "model_fingerprint") == meta(serial, "model_fingerprint")
    rows = comparable(out)
    assert len(rows) == EDITS and len({(r["job"], r["image"]) for r in rows}) == EDITS
    assert rows == comparable(serial)  # the same cache hits too: each job saw the stages a serial run shows it
    assert any(r["cache"].get("inversion") for r in rows if r["method"] == "nti" and r["pair"] == 9)
    assert files(out) == files(serial)  # byte for byte
    assert stage_entries(out) == stage_entries(serial)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:  # the workers are gone
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2


@pytest.fixture(scope="module")
def faults(cluster, tedbench):
    """A driver in another process joins the cluster by its address and is SIGKILLed once a job is in; the same
    command, run again in this process, resumes the run while one of its workers SIGKILLs itself after computing
    its first job (the test hook). One Ray run for both faults: each run starts workers, which import torch."""
    out = cluster["root"] / "faults"
    args = bench(tedbench, out, "--ray", cluster["address"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "nonrigid.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not done_job_keys(out) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read()
    before = read_rows(out)
    cluster["kill_file"].write_text("")
    assert main(args) == 0
    return {"out": out, "before": before, "kill_file_left": cluster["kill_file"].exists()}


def test_a_worker_killed_mid_job_loses_only_that_job(faults, serial):
    assert not faults["kill_file_left"], "no worker took the kill"
    rows = comparable(faults["out"])
    assert len(rows) == EDITS and len({r["image"] for r in rows}) == EDITS  # every row exactly once
    assert rows == comparable(serial)
    assert files(faults["out"]) == files(serial)


def test_a_killed_driver_resumes_like_a_serial_run(faults, serial):
    before, after = faults["before"], read_rows(faults["out"])
    assert 0 < len({r["job"] for r in before}) < JOBS, "the kill should land part-way"
    assert [(r["image"], r["created_at"]) for r in after[: len(before)]] == [
        (r["image"], r["created_at"]) for r in before]  # finished jobs were not redone
    assert comparable(faults["out"]) == comparable(serial)
    assert files(faults["out"]) == files(serial)


def test_without_ray_the_flag_says_which_extra_to_install(tedbench, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from nonrigid.cli import main; "
            f"sys.exit(main({bench(tedbench, tmp_path / 'run', '--ray')!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == "nonrigid: error: --ray needs Ray: pip install 'nonrigid[ray]'\n"
    assert not (tmp_path / "run").exists()


def test_ray_cpus_is_checked_and_workers_follow_the_cluster():
    assert main(["bench", "--data", ".", "--out", "x", "--ray", "--ray-cpus", "0"]) == 2
    assert worker_plan({"CPU": 16, "GPU": 4}, 1, groups=10) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert worker_plan({"CPU": 16}, 3, groups=10) == (5, {"num_cpus": 3})
    assert worker_plan({"CPU": 16}, 1, groups=2) == (2, {"num_cpus": 1})  # no more workers than groups
    with pytest.raises(UsageError, match="cpus_per_worker must be <= the Ray cluster's 2 CPUs"):
        worker_plan({"CPU": 2}, 4, groups=3)


def test_a_group_runs_one_job_at_a_time_in_order_and_a_lost_job_goes_first():
    jobs = ["a1", "a2", "b1", "c1", "c2"]
    groups = Groups(jobs, lambda job: job[0])
    assert groups.take(None) == ("a", "a1")
    assert groups.take(None) == ("b", "b1")  # a is running
    groups.requeue("a", "a1")  # its worker died
    assert groups.take("b") == ("a", "a1")  # b has no more jobs; a's lost job comes before a2
    groups.finished("a")
    assert groups.take("a") == ("a", "a2")  # a worker keeps to its group
    assert groups.take("b") == ("c", "c1")
    assert groups.take(None) is None  # a and c are running, b is done
    groups.finished("c")
    assert groups.take(None) == ("c", "c2")
    groups.finished("a")
    groups.finished("c")
    assert not groups.remaining()
