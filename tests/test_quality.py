"""Quality properties: they need a model that denoises, so they run on the trained miniature model.

Until that model exists (miniature-world issue) the ``model`` fixture skips them with that reason; they are never
loosened to pass on random weights.
"""

from __future__ import annotations

import torch

from nonrigid import invert, optimize_text, sample
from nonrigid.models.registry import family_of
from nonrigid.stages.text_optimization import TextOptimization


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def no_edit(inversion, prompt_embedding) -> TextOptimization:
    return TextOptimization("", prompt_embedding, prompt_embedding, [], 0, 0, 0.0)


def test_ddim_round_trip_at_guidance_1_returns_to_the_input_latent(model, model_image):
    inversion = invert(model, model_image, method="ddim", num_steps=50)
    x0 = family_of(model).encode_image(model_image)
    back = sample(model, inversion, no_edit(inversion, inversion.source_embedding), (0.0,), (50,),
                  output_type="latent")
    spread = float(x0.std())
    assert float((back[0] - x0[0]).abs().mean()) < 0.1 * spread
    assert relative_error(back[0], x0[0]) < 0.1


def test_nti_at_guidance_7_5_reconstructs_far_better_than_ddim_sampled_at_7_5(model, model_image):
    """With the scene's caption as source prompt: with an empty one cond = uncond and guidance changes nothing."""
    x0 = family_of(model).encode_image(model_image)
    source = source_prompt()
    nti = invert(model, model_image, source, method="nti", num_steps=50, guidance_scale=7.5)
    ddim = invert(model, model_image, source, method="ddim", num_steps=50, guidance_scale=7.5)
    keep = no_edit(nti, nti.source_embedding)
    nti_error = relative_error(sample(model, nti, keep, (0.0,), (50,), output_type="latent")[0], x0[0])
    ddim_error = relative_error(sample(model, ddim, keep, (0.0,), (50,), output_type="latent")[0], x0[0])
    assert nti_error < 0.5 * ddim_error


def source_prompt() -> str:
    """The caption of the scene ``model_image`` shows (render_example(seed=0))."""
    import random

    from nonrigid.mini.world import random_scene

    return random_scene(random.Random(0)).caption


def target_prompt() -> str:
    """A pose edit of the scene ``model_image`` shows (render_example(seed=0))."""
    import random

    from nonrigid.mini.world import POSES, random_scene

    scene = random_scene(random.Random(0))
    return scene.with_pose(next(p for p in POSES if p != scene.pose)).caption


def test_text_optimization_lowers_the_denoising_loss_on_fixed_draws(model, model_image):
    result = optimize_text(model, model_image, target_prompt(), steps=200, seed=0)
    x0 = family_of(model).encode_image(model_image)
    scheduler = family_of(model).sampling_scheduler(50)
    generator = torch.Generator().manual_seed(1234)  # the same draws for both embeddings: a paired comparison
    timesteps = torch.randint(0, 1000, (128,), generator=generator)
    noise = torch.randn((128, *x0.shape[1:]), generator=generator)
    noisy = scheduler.add_noise(x0.expand(128, -1, -1, -1), noise, timesteps)

    def loss(embedding):
        with torch.no_grad():
            return float(((family_of(model).predict(noisy, timesteps, embedding) - noise) ** 2).mean())

    assert loss(result.optimized_embedding) < loss(result.target_embedding)


def test_text_optimization_moves_the_output_toward_the_input(model):
    """In the method's own setting (NTI without source, 20% injection, 200 optimization steps), the optimized
    embedding (eta 0) gives outputs closer to the input image than the target text (eta 1) does, in mean absolute
    pixel difference averaged over the world's first three scenes, each edited to another pose.

    An average, because the claim is one about edits in general: on a scene whose edit barely moves the subject
    (scene 0, a white cat on sand, stays standing at every eta) the two outputs differ by noise. Measured on the
    committed model, scenes 0-9: eta 0 is closer on 8 of 10 and 13.1 vs 14.9 on average; scenes 0-2 give
    11.2 vs 14.0. The three scenes run as one batch, as the evaluation runs them (each equal to its run alone:
    tests/test_batching.py).
    """
    import random

    import numpy as np

    from nonrigid.methods.run import EditRequest, run_edits
    from nonrigid.mini.world import POSES, random_scene, render_example
    from nonrigid.models.registry import family_of

    def distance(image, reference) -> float:
        return float(np.abs(np.asarray(image, dtype=np.float32) - np.asarray(reference, dtype=np.float32)).mean())

    requests = []
    for seed in range(3):
        scene = random_scene(random.Random(seed))
        target = scene.with_pose(next(pose for pose in POSES if pose != scene.pose)).caption
        requests.append(EditRequest(render_example(seed=seed), target))
    results = run_edits(family_of(model), requests, "ours", {"etas": (0.0, 1.0), "inject": (0.2,), "opt_steps": 200,
                                                        "inversion": "nti", "num_steps": 50}, seeds=(0,))
    optimized_distances, plain_distances = [], []
    for request, result in zip(requests, results, strict=True):
        optimized, plain = (v.image for v in result.variants)
        assert [v.knobs["eta"] for v in result.variants] == [0.0, 1.0]
        optimized_distances.append(distance(optimized, request.image))
        plain_distances.append(distance(plain, request.image))

    assert np.mean(optimized_distances) < np.mean(plain_distances), (optimized_distances, plain_distances)


def test_samples_show_the_captioned_pose_kind_and_colour(model):
    """The model draws what its captions say: the judge, trained on renders only, reads the captioned pose, kind
    and colour back from the model's samples far more often than chance (1/4, 1/3, 1/8)."""
    from nonrigid.mini.fidelity import sample_fidelity
    from nonrigid.mini.judge import load_judge

    model.set_progress_bar_config(disable=True)
    fidelity = sample_fidelity(model, load_judge(), per_pose=8, steps=20, guidance=4.0, seed=3, progress=False)
    accuracy = fidelity.accuracy
    assert accuracy["pose"] >= 0.7 and accuracy["kind"] >= 0.6 and accuracy["colour"] >= 0.8, (
        fidelity.line()
    )
