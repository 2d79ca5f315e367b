"""Edit-friendly DDPM inversion and DDS: exact properties on the tiny model, DDS's progress on the trained one."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from nonrigid import run_method
from nonrigid.api import only
from nonrigid.errors import UsageError
from nonrigid.methods.dds import (
    REFERENCE_LATENT_AREA,
    DDSJob,
    dds_delta,
    dds_deltas,
    dds_draws,
    dds_optimize,
    expected_delta_norm,
)
from nonrigid.methods.edit_friendly import edit_friendly_invert, edit_friendly_sample
from nonrigid.models.family import Conditioning
from nonrigid.models.registry import family_of


def dds_run(model, x0, source, target, iterations, seed: int = 0, **settings):
    """One DDS run: :func:`dds_optimize`'s batch of one."""
    job = DDSJob(x0, Conditioning.of(source), Conditioning.of(target), seed)
    return only(dds_optimize(model, [job], iterations, **settings))


N = 6  # DDPM steps: enough for several skip values, few enough to be fast
SOURCE = "a photo of a dog"
TARGET = "a photo of a jumping dog"


@pytest.fixture(scope="module")
def x0(tiny_pipe, dog_image) -> torch.Tensor:
    return family_of(tiny_pipe).encode_image(dog_image)


@pytest.fixture(scope="module")
def texts(tiny_pipe) -> dict[str, torch.Tensor]:
    return {p: family_of(tiny_pipe).encode_prompt(p).tokens for p in ("", SOURCE, TARGET)}


def weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("unet", "vae", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def pipe_state(pipe) -> tuple:
    """Everything besides the weights a method could leave changed: scheduler state, attention processors, grads."""
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    flags = [(p.requires_grad, p.grad is None) for m in modules for p in m.parameters()]
    return dict(pipe.scheduler.config), pipe.scheduler.num_inference_steps, processors, flags


def assert_untouched(pipe, before_weights, before_state) -> None:
    after = weights(pipe)
    assert [k for k in before_weights if not torch.equal(before_weights[k], after[k])] == []
    assert pipe_state(pipe) == before_state


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------ edit-friendly DDPM


@pytest.mark.parametrize("source, guidance", [("", 3.5), (SOURCE, 3.5), (SOURCE, 1.0), (SOURCE, 15.0)])
def test_ef_sampling_with_the_source_prompt_reproduces_the_image_latent_for_every_skip(
    tiny_pipe, x0, texts, source, guidance
):
    inversions = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[source]], [(0, 3)], N, guidance))
    skips = (0, 1, N // 2, N - 1, N)
    back = edit_friendly_sample(family_of(tiny_pipe), inversions, texts[source], guidance, skips)
    tolerance = 1e-4 * float(x0.abs().max())
    assert back.shape == (2 * len(skips), *x0.shape[1:])
    assert float((back - x0).abs().max()) < tolerance
    # Not vacuous: the same starts without the extracted noise maps land far away.
    blank = [dataclasses.replace(inv, zs=torch.zeros_like(inv.zs)) for inv in inversions]
    assert float((edit_friendly_sample(family_of(tiny_pipe), blank, texts[source], guidance, (0,)) - x0).abs().max()) \
        > 100 * tolerance


def test_ef_noisy_latents_are_independent_seeded_draws_per_step(tiny_pipe, x0, texts):
    (inversion,) = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(5,)], N, 3.5))
    scheduler = family_of(tiny_pipe).sampling_scheduler(N)
    noise = torch.randn((N, *x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    abar = scheduler.alphas_cumprod[scheduler.timesteps].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.equal(inversion.timesteps, scheduler.timesteps)
    torch.testing.assert_close(inversion.xs[0], expected[0], atol=1e-7, rtol=0)  # never re-stored
    # later ones are re-stored as what the step with z computes: the same up to rounding
    torch.testing.assert_close(inversion.xs[:N], expected, atol=1e-6, rtol=0)
    assert torch.equal(inversion.xs[N], x0[0])
    assert inversion.zs.shape == (N, *x0.shape[1:])
    (other,) = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(6,)], N, 3.5))
    assert not torch.allclose(inversion.zs, other.zs)


def test_ef_each_step_replays_exactly_onto_the_stored_trajectory(tiny_pipe, x0, texts):
    """The noise map of step i is the one that makes diffusers' eta = 1 step from xs[i] land on xs[i + 1]."""
    (inversion,) = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(2,)], N, 3.5))
    scheduler = family_of(tiny_pipe).sampling_scheduler(N)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[:-1]):
            x = inversion.xs[i : i + 1]
            eps = family_of(tiny_pipe).predict(x, t, texts[SOURCE], texts[""], 3.5)
            step = scheduler.step(eps, t, x, eta=1.0, variance_noise=inversion.zs[i : i + 1]).prev_sample
            assert torch.equal(step[0], inversion.xs[i + 1])


def test_ef_edits_with_the_target_and_batching_does_not_change_a_variant(tiny_pipe, x0, texts):
    inversions = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(0, 1)], N, 3.5))
    edited = edit_friendly_sample(family_of(tiny_pipe), inversions, texts[TARGET], 7.5, (0, 2, N))
    tolerance = 1e-4 * float(x0.abs().max())
    assert float((edited[0] - x0[0]).abs().max()) > 100 * tolerance
    assert torch.equal(edited[2], x0[0]) and torch.equal(edited[5], x0[0])  # skip = N: nothing sampled
    assert not torch.allclose(edited[0], edited[3])  # seeds give different noise maps, so different edits
    # seed 1 alone, each skip alone: the same rows as in the batch of every (seed, skip)
    (alone,) = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(1,)], N, 3.5))
    torch.testing.assert_close(alone.zs, inversions[1].zs, atol=1e-4, rtol=1e-4)
    for row, skip in ((3, 0), (4, 2)):
        single = edit_friendly_sample(family_of(tiny_pipe), [alone], texts[TARGET], 7.5, (skip,))
        torch.testing.assert_close(single[0], edited[row], atol=1e-4 * float(edited[row].abs().max()), rtol=0)


def test_ef_run_method_variants_match_the_low_level_functions_and_leave_the_pipe_alone(tiny_pipe, dog_image, x0,
                                                                                         texts):
    before_weights, before_state = weights(tiny_pipe), pipe_state(tiny_pipe)
    params = {"num_steps": 4, "skip": (2, 0), "source_guidance": 3.5, "target_guidance": 10.0}
    result = run_method(tiny_pipe, dog_image, TARGET, "edit-friendly", params=params, seeds=(1, 0),
                        source_prompt=SOURCE, size=64)
    assert_untouched(tiny_pipe, before_weights, before_state)
    assert [(v.seed, v.knobs) for v in result.variants] == [
        (1, {"skip": 2}), (1, {"skip": 0}), (0, {"skip": 2}), (0, {"skip": 0})]
    assert result.knob_labels == ("skip",)
    assert all(v.image.size == (64, 64) and v.image.mode == "RGB" for v in result.variants)
    assert {"inversion", "sampling", "decoding", "total"} <= result.timings.keys()
    assert result.record["target_guidance"] == 10.0 and set(result.record["noise_map_std"]) == {0, 1}
    inversions = only(edit_friendly_invert(family_of(tiny_pipe), [x0], [texts[SOURCE]], [(1, 0)], 4, 3.5))
    model = family_of(tiny_pipe)
    expected = model.decode(edit_friendly_sample(model, inversions, texts[TARGET], 10.0, (2, 0)))
    for variant, image in zip(result.variants, expected, strict=True):
        assert np.array_equal(pixels(variant.image), pixels(image))


def test_ef_run_method_with_the_source_as_target_gives_back_the_input_latent(tiny_pipe, dog_image, x0):
    params = {"num_steps": 4, "skip": (0, 3), "source_guidance": 5.0, "target_guidance": 5.0}
    result = run_method(tiny_pipe, dog_image, SOURCE, "edit-friendly", params=params, source_prompt=SOURCE, size=64)
    (reference,) = family_of(tiny_pipe).decode(x0)
    assert len(result.variants) == 2
    for variant in result.variants:  # latents agree to 1e-8: at most a rounding flip in the pixels
        assert np.abs(pixels(variant.image) - pixels(reference)).max() <= 1


def test_ef_skip_beyond_the_steps_is_a_usage_error(tiny_pipe, dog_image):
    with pytest.raises(UsageError, match="skip"):
        run_method(tiny_pipe, dog_image, TARGET, "edit-friendly", params={"num_steps": 4, "skip": (2, 5)}, size=64)


# ------------------------------------------------------------------------------------------------------ DDS


def test_dds_with_the_source_as_target_leaves_the_latent_bit_identical(tiny_pipe, x0, texts):
    same = family_of(tiny_pipe).encode_prompt(SOURCE).tokens  # a separate encoding of the same prompt
    result = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], same, (1, 6), seed=0, lr=10.0)
    assert torch.equal(result.snapshots[1], x0) and torch.equal(result.snapshots[6], x0)
    assert result.losses == [0.0] * 6
    # the same run with a different target does move (the zero above is not a dead optimiser)
    moved = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], texts[TARGET], (1,), seed=0, lr=10.0)
    assert float((moved.snapshots[1] - x0).abs().max()) > 1e-3


def test_dds_step_is_sgd_on_the_scaled_delta_with_seeded_draws(tiny_pipe, x0, texts):
    lr, loss_scale, seed = 0.3, 1000.0, 4
    result = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], texts[TARGET], (1, 2), seed=seed, lr=lr,
                          loss_scale=loss_scale)
    draws = dds_draws(torch.Generator().manual_seed(seed), x0.shape, 50, 950, 2, x0.device)
    assert result.timesteps == [d.timestep for d in draws]
    step = lr * loss_scale / REFERENCE_LATENT_AREA
    previous = x0
    for n, draw in zip((1, 2), draws, strict=True):  # each step checked from the run's own previous latent
        delta = dds_delta(family_of(tiny_pipe), previous, x0, torch.tensor([draw.timestep]), draw.noise,
                          Conditioning.of(texts[TARGET]), Conditioning.of(texts[SOURCE]), texts[""], 7.5)
        assert result.losses[n - 1] == pytest.approx(float(delta.pow(2).mean()), rel=1e-5)
        torch.testing.assert_close(result.snapshots[n], previous - step * delta, atol=1e-7, rtol=1e-6)
        previous = result.snapshots[n]


def test_dds_timesteps_cover_the_closed_range():
    draws = dds_draws(torch.Generator().manual_seed(0), (1, 4, 2, 2), 10, 12, 60, torch.device("cpu"))
    assert {d.timestep for d in draws} == {10, 11, 12}
    assert {d.timestep for d in dds_draws(torch.Generator(), (1, 4, 2, 2), 7, 7, 5, torch.device("cpu"))} == {7}


def test_dds_snapshots_are_prefixes_of_one_run_and_seeds_matter(tiny_pipe, x0, texts):
    long = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], texts[TARGET], (2, 4), seed=0)
    short = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], texts[TARGET], (2,), seed=0)
    other = dds_run(family_of(tiny_pipe), x0, texts[SOURCE], texts[TARGET], (4,), seed=1)
    assert torch.equal(long.snapshots[2], short.snapshots[2]) and long.losses[:2] == short.losses
    assert len(long.losses) == 4 and not torch.equal(long.snapshots[2], long.snapshots[4])
    assert not torch.allclose(long.snapshots[4], other.snapshots[4])


def test_dds_run_method_variants_and_the_pipe_left_alone(tiny_pipe, dog_image, x0):
    before_weights, before_state = weights(tiny_pipe), pipe_state(tiny_pipe)
    params = {"iterations": (0, 3, 1), "lr": 0.1}
    result = run_method(tiny_pipe, dog_image, TARGET, "dds", params=params, seeds=(2, 0), source_prompt=SOURCE,
                        size=64)
    assert_untouched(tiny_pipe, before_weights, before_state)
    assert [(v.seed, v.knobs) for v in result.variants] == [
        (s, {"iter": n}) for s in (2, 0) for n in (0, 3, 1)]
    assert result.knob_labels == ("iter",)
    assert all(v.image.size == (64, 64) and v.image.mode == "RGB" for v in result.variants)
    assert {"encoding", "optimization", "decoding", "total"} <= result.timings.keys()
    assert {seed: len(losses) for seed, losses in result.record["dds_loss"].items()} == {2: 3, 0: 3}
    (reference,) = family_of(tiny_pipe).decode(x0)
    changes = {(v.seed, v.knobs["iter"]): v.record["latent_change"] for v in result.variants}
    assert changes[(2, 0)] == changes[(0, 0)] == 0.0 and min(changes[(2, 1)], changes[(2, 3)]) > 0
    assert np.abs(pixels(result.variants[0].image) - pixels(reference)).max() <= 1
    # with the source prompt as target every snapshot is the input
    same = run_method(tiny_pipe, dog_image, SOURCE, "dds", params={"iterations": (2,)}, source_prompt=SOURCE,
                      size=64)
    assert same.variants[0].record["latent_change"] == 0.0
    assert same.record["dds_loss"] == {0: [0.0, 0.0]}


def test_dds_bad_timestep_range_is_a_usage_error(tiny_pipe, dog_image):
    with pytest.raises(UsageError, match="t_min"):
        run_method(tiny_pipe, dog_image, TARGET, "dds", params={"iterations": (1,), "t_min": 600, "t_max": 500},
                   size=64)


def test_dds_on_the_trained_model_approaches_its_fixed_point_and_the_target_prompt(model, model_image):
    """The logged loss mean(delta^2) is not expected to fall (see nonrigid.methods.dds); these two things are.

    On fixed draws independent of the optimisation's own: (1) the expected delta, the direction DDS follows, shrinks;
    (2) the model's denoising error under the target caption, relative to the source caption, goes from worse to
    better (a diffusion-classifier view: the latent now matches the target text better than the source text).
    """
    from nonrigid.mini.world import random_scene

    scene = random_scene(random.Random(0))  # the scene model_image shows
    source = family_of(model).encode_prompt(scene.caption).tokens
    pose = "jumping" if scene.pose != "jumping" else "sitting"
    target = family_of(model).encode_prompt(scene.with_pose(pose).caption).tokens
    x_src = family_of(model).encode_image(model_image)
    result = dds_run(family_of(model), x_src, source, target, (40,), seed=0)
    draws = dds_draws(torch.Generator().manual_seed(1234), x_src.shape, 50, 950, 10, x_src.device)
    timesteps = torch.tensor([d.timestep for d in draws])
    noise = torch.cat([d.noise for d in draws])

    def target_preference(latent: torch.Tensor) -> float:
        noisy = family_of(model).add_noise(latent.expand(len(draws), -1, -1, -1), noise, timesteps)
        with torch.no_grad():
            errors = [((family_of(model).predict(noisy, timesteps, e) - noise) ** 2).mean() for e in (target, source)]
        return float(errors[0] - errors[1])

    def fixed_point_distance(latent: torch.Tensor) -> float:
        return expected_delta_norm(dds_deltas(family_of(model), latent, x_src, draws, target, source, 7.5))

    edited = result.snapshots[40]
    assert fixed_point_distance(edited) < 0.6 * fixed_point_distance(x_src)
    assert target_preference(x_src) > 0 > target_preference(edited)
