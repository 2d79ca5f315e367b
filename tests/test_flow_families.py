"""SD3 (rectified flow) through the model seam, with diffusers as the oracle.

On a tiny random-weight SD3 pipeline (``tiny-sd3``: SD3's layout, no T5): with the edit switched off (no text
optimization, eta 1, K 0), the paper's sampling from a given x_T equals ``StableDiffusion3Pipeline`` called with
``latents=x_T``; our flow inversion equals an independent loop over diffusers' scheduler sigmas driven by the
pipeline's own prompt encoding and transformer; the training example is the flow-matching one; generation equals
the pipeline from the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nonrigid import edit, invert, sample
from nonrigid.models.flow import FlowEuler
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.inversion import invert_latents
from nonrigid.stages.sampling import generate

PROMPT = "a photo of a jumping dog"
STEPS = 5
SIDE = 64


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-sd35"])
def pipe(request):
    """SD3 medium's layout, and SD3.5's (RMS-normed queries and keys, a dual-attention layer)."""
    return load_pipeline(request.param, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def picture(dog_image):
    return dog_image.resize((SIDE, SIDE))


def test_sd3_is_detected_with_its_flow_schedule_and_conditioning(pipe):
    family = family_of(pipe)
    assert family.name == "sd3" and "without T5" in family.describe() and "shift 3" in family.describe()
    qk_norm = pipe.transformer.config.qk_norm is not None
    assert family.describe().startswith("SD3.5 layout" if qk_norm else "SD3 layout")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)  # not replaced by DDIM
    assert family.defaults.size == SIDE and family.defaults.guidance_scale == 7.0
    cond = family.encode_prompt(PROMPT)
    assert cond.tokens.shape == (1, 77 + 256, 64) and cond.tensors["pooled"].shape == (1, 16 + 32)
    assert float(cond.tokens[:, 77:].abs().max()) == 0  # no T5: its part is zeros, as diffusers builds it
    # the unconditional branch is the empty prompt's encoding, as the pipeline's default negative prompt
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPT, None, None, device="cpu",
                                                        do_classifier_free_guidance=True)
    uncond = family.unconditional()
    torch.testing.assert_close(uncond.tokens, negative, atol=0, rtol=0)
    torch.testing.assert_close(uncond.tensors["pooled"], negative_pooled, atol=0, rtol=0)
    assert float(negative_pooled.abs().max()) > 0  # not zeros: SD3 does not zero the empty prompt


@pytest.mark.parametrize("guidance", [1.0, 7.0])
def test_sampling_with_the_edit_off_equals_the_diffusers_pipeline(pipe, picture, guidance):
    result = edit(pipe, picture, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=guidance, num_steps=STEPS)
    x_t = result.stages.inversion.latent
    ours = sample(pipe, result.stages.inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    theirs = pipe(prompt=PROMPT, latents=x_t.clone(), num_inference_steps=STEPS, guidance_scale=guidance,
                  height=SIDE, width=SIDE, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.equal(ours, x_t)


def test_sampling_with_a_negative_prompt_equals_the_diffusers_pipeline(pipe, picture):
    from dataclasses import replace

    result = edit(pipe, picture, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=5.0, num_steps=STEPS)
    inversion = replace(result.stages.inversion, unconditional=family_of(pipe).encode_prompt("a blurry photo"))
    ours = sample(pipe, inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    theirs = pipe(prompt=PROMPT, negative_prompt="a blurry photo", latents=inversion.latent.clone(),
                  num_inference_steps=STEPS, guidance_scale=5.0, height=SIDE, width=SIDE,
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_generating_equals_the_diffusers_pipeline_from_the_same_noise(pipe, guidance):
    ours = generate(family_of(pipe), PROMPT, seed=5, num_steps=STEPS, guidance_scale=guidance)
    noise = family_of(pipe).initial_noise(SIDE, torch.Generator().manual_seed(5))
    assert noise.shape == (1, 16, SIDE // 8, SIDE // 8)
    theirs = pipe(prompt=PROMPT, latents=noise, num_inference_steps=STEPS, guidance_scale=guidance, height=SIDE,
                  width=SIDE).images[0]
    assert ours.size == (SIDE, SIDE)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def oracle_inversion(pipe, x0: torch.Tensor, prompt: str, steps: int) -> torch.Tensor:
    """Flow inversion at guidance 1 written against diffusers alone: the pipeline's scheduler sigmas (set as the
    pipeline sets them), its prompt encoding, its transformer. Sampling step i goes s_i -> s_{i+1} with the
    velocity at timestep t_i; inversion undoes the steps last first, querying t_i at the current latent."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    tokens, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False)
    x, path = x0, [x0]
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = scheduler.timesteps[i]
            v = pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=tokens,
                                 pooled_projections=pooled).sample
            x = x + (scheduler.sigmas[i] - scheduler.sigmas[i + 1]) * v
            path.append(x)
    return torch.cat(path)


def test_flow_inversion_equals_a_loop_over_diffusers_sigmas(pipe, picture):
    family = family_of(pipe)
    x0 = family.encode_image(picture)
    ours = invert_latents(family, x0, family.encode_prompt(PROMPT), STEPS)[0]
    theirs = oracle_inversion(pipe, x0, PROMPT, STEPS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.shape == (STEPS + 1, 16, 8, 8)


def test_flow_inversion_is_the_exact_inverse_of_euler_sampling_for_a_field_constant_in_x():
    """The inverse walk undoes each Euler step with the velocity at the point at hand: where the velocity does
    not depend on the latent, sampling after inverting returns the start exactly."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(7)
    forward = FlowEuler.from_diffusers(scheduler)

    def field(t):
        return torch.full((1, 2, 3, 3), float(t) / 500 - 1.0)

    x0 = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    x = x0
    for t in forward.inverse().timesteps:
        x = forward.inverse().step(field(t), t, x).prev_sample
    torch.testing.assert_close(x, x0 + sum((forward.sigma_from - forward.sigma_to)[i] * field(t)
                                           for i, t in enumerate(forward.timesteps)), atol=1e-6, rtol=0)
    for t in forward.timesteps:
        x = forward.step(field(t), t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)
    # and the stateless stepper equals diffusers' own step, which keeps a counter
    sample = torch.randn(1, 2, 3, 3)
    for t in scheduler.timesteps:
        torch.testing.assert_close(forward.step(field(t), t, sample).prev_sample,
                                   scheduler.step(field(t), t, sample).prev_sample, atol=0, rtol=0)


def test_text_optimization_regresses_the_flow_matching_target(pipe):
    """x_s = (1 - s) x0 + s noise, target v = noise - x0, with s = t / 1000; the timesteps are drawn logit-normal
    over the shifted training schedule, as diffusers' SD3 training script draws them."""
    family = family_of(pipe)
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    t = torch.tensor([250.0, 900.0])
    noisy, target = family.training_example(x0, noise, t)
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(family.noise_estimate(target, noisy, t), noise, atol=1e-5, rtol=0)

    training = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # 1000 shifted timesteps
    drawn = [family.draw_training_timestep(torch.Generator().manual_seed(seed)) for seed in range(20)]
    for seed, timestep in enumerate(drawn):
        u = torch.sigmoid(torch.normal(0.0, 1.0, size=(1,), generator=torch.Generator().manual_seed(seed)))
        assert float(timestep) == float(training.timesteps[int(u * 1000)])
    # shift 3 pushes the logit-normal median (u = 0.5: sigma 0.5) up to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert 600 < float(torch.cat(drawn).median()) < 850


def test_null_text_inversion_on_sd3_retraces_the_inverted_path_better_than_the_empty_prompt(pipe, picture):
    """NTI carries over: optimising the unconditional conditioning per step brings the guided (w = 7) sampling
    path closer to the inverted one than the empty prompt's encoding does."""
    nti = invert(pipe, picture, PROMPT, "nti", num_steps=4, guidance_scale=7.0, inner_steps=5, early_stop=0.0)
    assert set(nti.nulls.tensors) == {"tokens", "pooled"} and nti.nulls.batch == 4
    family = family_of(pipe)
    scheduler = family.sampling_scheduler(4)
    x, errors_plain, errors_nti = nti.latent, [], []
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(family.predict(x, t, nti.source, family.unconditional(), 7.0), t, x).prev_sample
            errors_plain.append(float((x - nti.trajectory[3 - i]).pow(2).mean()))
            errors_nti.append(float((nti.reconstruction[i + 1] - nti.trajectory[3 - i]).pow(2).mean()))
    assert errors_nti[-1] < errors_plain[-1]
