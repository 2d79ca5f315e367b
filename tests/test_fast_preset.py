"""The fast preset (issue 27): a set of ours' knobs chosen on the miniature world (docs/MINIATURE.md), offered as
``--fast`` on ``edit`` and ``bench``, a checkbox on the page and ``preset="fast"`` in the API. Its evidence is on
the page; here: what it costs in sequential UNet calls, that every way in applies the same values under the
user's own, and that it is refused in one line where it does not apply."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_cli import FAST as CLI_FAST
from test_cli import run_cli

from nonrigid import load_pipeline
from nonrigid.evaluation.plan import plan_settings
from nonrigid.methods.base import resolve_params
from nonrigid.methods.catalogue import DEFAULT_INJECT, FAST, NTI, OURS
from nonrigid.models.registry import family_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure import UNetCounter

OURS_DEFAULTS = resolve_params(OURS, {})


def most_calls(num_steps: int, inner_steps: int, inject: float = DEFAULT_INJECT[0]) -> int:
    """The most sequential UNet calls an edit of one seed makes: the DDIM walk, NTI's inner calls and its advancing
    call per step, the sampling steps after the K injected ones (those come from NTI's reconstruction). Stage A
    adds none while its steps are no more than NTI's calls. NTI's early stop only ever skips inner calls."""
    return num_steps + num_steps * (inner_steps + 1) + num_steps - round(inject * num_steps)


def test_a_fast_edit_makes_at_most_a_fifth_of_the_default_edits_calls(tiny_pipe, dog_image):
    """At most a fifth of the calls the default edit may make (640: 50 steps, 10 inner steps; 890 before stage A
    rode along stage B), counted on the same model and picture. The fast edit makes its most here (120); the
    default's early stop saved some inner calls on this picture, so its count is below its most."""
    from nonrigid import run_method

    def calls(preset: str | None) -> tuple[int, object]:
        with UNetCounter(tiny_pipe.unet) as counter:
            result = run_method(tiny_pipe, dog_image, "a photo of a jumping dog", "ours", {"etas": (0.5,)},
                                size=64, preset=preset)
        return counter.tally.calls, result

    default, _ = calls(None)
    fast, result = calls("fast")
    n, inner = FAST["num_steps"], FAST["inner_steps"]
    assert FAST["opt_steps"] <= n * (inner + 1)  # A rides along B
    assert fast == most_calls(n, inner) == 120
    assert default <= most_calls(OURS_DEFAULTS["num_steps"], OURS_DEFAULTS["inner_steps"]) == 640
    assert 5 * fast <= 640 and default > 5 * 110  # and the default is no cheap run either: 586 here
    assert result.params["num_steps"] == n and result.params["opt_steps"] == FAST["opt_steps"]
    assert result.record["preset"] == "fast"


def test_the_callers_values_win_over_the_preset_and_a_few_step_model_keeps_its_steps():
    assert resolve_params(OURS, {}, preset="fast") == resolve_params(OURS, FAST)
    mine = resolve_params(OURS, {"num_steps": 8, "opt_steps": 3}, preset="fast")
    assert (mine["num_steps"], mine["opt_steps"]) == (8, 3)
    assert (mine["inner_steps"], mine["opt_lr"]) == (FAST["inner_steps"], FAST["opt_lr"])
    schnell = family_of(load_pipeline("tiny-flux-schnell", device="cpu", dtype="fp32"))
    assert resolve_params(OURS, {}, schnell, preset="fast")["num_steps"] == schnell.default_steps
    with pytest.raises(Exception, match=r"method 'nti' has no preset 'fast' \(it has none\)"):
        resolve_params(NTI, {}, preset="fast")


def test_edit_fast_records_the_preset_and_its_values_under_the_flags(tmp_path, tedbench):
    image = tedbench / "originals" / "cat.jpeg"
    out = tmp_path / "out"
    done = run_cli(["edit", str(image), "A photo of a sitting cat.", "--fast", "--out", str(out), "--eta", "0.5",
                    *CLI_FAST], tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "edit.json").read_text())
    assert manifest["preset"] == "fast"
    params = manifest
    # --steps 5 --opt-steps 3 --inner-steps 2 (the test's quick flags) win; the rest is the preset's
    assert (params["num_steps"], params["opt_steps"], params["inner_steps"]) == (5, 3, 2)
    assert params["opt_lr"] == FAST["opt_lr"]


def test_fast_with_a_method_that_has_no_preset_is_refused_in_one_line(tmp_path, tedbench):
    image = tedbench / "originals" / "cat.jpeg"
    for command in (["edit", str(image), "a cat", "--method", "nti", "--fast", "--out", str(tmp_path / "o")],
                    ["bench", "--data", str(tedbench), "--method", "nti", "--fast", "--out", str(tmp_path / "b")]):
        done = run_cli(command, tmp_path, tmp_path / "cache")
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "fast is a preset of ours" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


def test_bench_fast_sets_ours_alone_and_leaves_what_the_user_set():
    plain = plan_settings(["ours", "nti"], [], ["inner_steps=4"])
    fast = plan_settings(["ours", "nti"], [], ["inner_steps=4"], fast=True)
    assert fast["nti"] == plain["nti"]
    (setting,) = fast["ours"]
    assert setting.params == {"num_steps": FAST["num_steps"], "opt_steps": FAST["opt_steps"],
                              "opt_lr": FAST["opt_lr"], "inner_steps": 4}
    (swept,) = plan_settings(["ours"], ["opt_steps=50"], [], fast=True)["ours"]
    assert swept.params["opt_steps"] == 50


def test_the_page_fast_checkbox_applies_the_preset_under_the_knobs(tiny_pipe, tmp_path):
    from test_ui import EXAMPLE, TARGET

    from nonrigid.ui.session import Editor

    editor = Editor("tiny", tmp_path / "out", cache_dir=tmp_path / "cache")
    editor.family = family_of(tiny_pipe)
    outcome = editor.edit(EXAMPLE, TARGET, params={"num_steps": 4, "opt_steps": 2, "etas": (0.5,)}, fast=True)
    params = json.loads((outcome.folder / "edit.json").read_text())
    assert (params["num_steps"], params["opt_steps"]) == (4, 2)
    assert (params["inner_steps"], params["opt_lr"]) == (FAST["inner_steps"], FAST["opt_lr"])
