"""Quality on the further families' miniature models: `mini-v` (v prediction), `mini-xl` (SDXL layout) and
`mini-flow` (SD3 layout, rectified flow).

As `test_quality.py` does for SD 1.x's miniature model: an inversion must reconstruct, null-text inversion must
beat DDIM under guidance, and an edit must change the pose. These need trained models; they skip (saying so)
only where the package was installed without them.
"""

from __future__ import annotations

import random

import pytest
import torch

from nonrigid import invert, sample
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.text_optimization import TextOptimization

STEPS = 50

# Where a model does not (yet) reach what issue 13 asks, said here and checked to still fall short (strict xfail):
# when a better recipe gets there, these tests start passing and strict mode makes us remove the entry.
FALLS_SHORT = {
    ("round_trip", "mini-v"): "mini-v's DDIM round trip is 0.053 on these six scenes (issue 13 asks < 0.05; "
    "its parent, the SD 1.x miniature model, 0.039)",
    ("edit", "mini-flow"): "on mini-flow ours at eta 1 turns 1 of these 3 subjects into the target pose (0.56 of "
    "the 12 pairs of its MINIATURE.md section, where FlowEdit reaches 0.74); issue 16 asks for the comparison, "
    "which is reported, not for a success rate",
}



def expect(request, check: str) -> None:
    name = request.node.callspec.params["family_model"]
    if (check, name) in FALLS_SHORT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=FALLS_SHORT[(check, name)]))


@pytest.fixture(scope="module", params=["mini-v", "mini-xl", "mini-flow"])
def family_model(request):
    try:
        return load_pipeline(request.param, device="cpu", dtype="fp32")
    except Exception as err:
        pytest.skip(f"needs the trained {request.param} model: {err}")


def scene_and_caption(seed: int):
    from nonrigid.mini.world import random_scene, render_example

    return render_example(seed=seed), random_scene(random.Random(seed)).caption


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reconstruct(pipe, inversion) -> torch.Tensor:
    keep = TextOptimization("", inversion.source, inversion.source, [], 0, 0, 0.0)
    return sample(pipe, inversion, keep, (0.0,), (inversion.num_steps,), output_type="latent",
                  use_reconstruction=False)[0]


def test_the_model_is_the_family_it_stands_for(family_model):
    family = family_of(family_model)
    if family.name == "sd":
        assert family.prediction_type == "v_prediction"
    else:
        assert family.name in ("sdxl", "sd3") and set(family.encode_prompt("a red dog").tensors) == {"tokens",
                                                                                                  "pooled"}


def test_ddim_round_trip_at_guidance_1_is_below_5_percent(family_model, request):
    """Relative latent error of the DDIM round trip with the scene's caption, averaged over six scenes (the SD 1.x
    miniature model: 0.039)."""
    expect(request, "round_trip")
    errors = []
    for seed in range(6):
        image, caption = scene_and_caption(seed)
        x0 = family_of(family_model).encode_image(image)[0]
        inversion = invert(family_model, image, caption, method="ddim", num_steps=STEPS, guidance_scale=1.0)
        errors.append(relative_error(reconstruct(family_model, inversion), x0))
    assert sum(errors) / len(errors) < 0.05, errors


def test_nti_at_7_5_reconstructs_far_better_than_ddim_at_7_5(family_model):
    """At 25 steps (NTI's cost grows with the steps; the doc's numbers are at 50). On the flow model at its
    family's default guidance (SD3's 7), against the plain (Euler) inversion sampled back at that guidance."""
    from nonrigid.mini.family_doc import guidance_for

    guidance = guidance_for(family_of(family_model))
    image, caption = scene_and_caption(0)
    x0 = family_of(family_model).encode_image(image)[0]
    nti = invert(family_model, image, caption, method="nti", num_steps=25, guidance_scale=guidance)
    ddim = invert(family_model, image, caption, method="ddim", num_steps=25, guidance_scale=guidance)
    nti_error = relative_error(reconstruct(family_model, nti), x0)
    ddim_error = relative_error(reconstruct(family_model, ddim), x0)
    assert nti_error < 0.5 * ddim_error, (nti_error, ddim_error)


def test_an_edit_changes_the_pose(family_model, request, tmp_path):
    """The paper's method as the miniature evaluation runs it (NTI without source, injection 20%, 50 steps) at eta 1
    turns the subject into the target pose, as the judge reads it, on most of the world benchmark's first pairs
    (`nonrigid mini dataset`, seed 0). At eta 1 the conditioning is the target text's whatever stage A found
    (e_1 = e_tgt bit for bit: tests/test_claims.py), so stage A runs one step instead of 200: the same images. The
    three pairs run as one batch, as the evaluation runs them (each equal to its run alone: tests/test_batching.py)."""
    expect(request, "edit")
    from PIL import Image

    from nonrigid.methods.run import EditRequest, run_edits
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.judge import load_judge, score_edit
    from nonrigid.models.registry import family_of

    judge = load_judge()
    write_dataset(tmp_path / "data", count=3, edits_per_image=1, seed=0)
    pairs = read_dataset(tmp_path / "data")
    requests = [EditRequest(Image.open(pair.image).convert("RGB"), pair.target_text) for pair in pairs]
    results = run_edits(family_of(family_model), requests, "ours", {"etas": (1.0,), "num_steps": STEPS, "opt_steps": 1})
    successes = [score_edit(judge, pair.scene, pair.target_pose, result.variants[0].image)["pose_correct"]
                 for pair, result in zip(pairs, results, strict=True)]
    assert sum(successes) / len(successes) >= 2 / 3, successes
