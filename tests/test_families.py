"""SD 2.x (epsilon and v) and SDXL through the model seam, with diffusers as the oracle.

On tiny random-weight pipelines in each layout: with the edit switched off (no text optimization, eta 1, K 0),
the paper's sampling from a given x_T equals diffusers' own ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` called with ``latents=x_T``; our DDIM inversion equals a loop over diffusers'
``DDIMInverseScheduler`` driven by the pipeline's own prompt encoding (and, for SDXL, its own size conditioning).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionXLPipeline

from nonrigid import edit, sample
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.inversion import invert_latents

KINDS = ("tiny-sd2", "tiny-sd2-v", "tiny-sdxl")
PROMPT = "a photo of a jumping dog"
STEPS = 6


@pytest.fixture(scope="module", params=KINDS)
def pipe(request):
    return load_pipeline(request.param, device="cpu", dtype="fp32")


def size_of(pipe) -> int:
    return family_of(pipe).defaults.size


def test_families_are_detected_from_the_model(pipe):
    family = family_of(pipe)
    v = pipe.scheduler.config.prediction_type == "v_prediction"
    assert family.name == ("sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd")
    assert ("v_prediction" in family.describe()) == v
    # the reference's DDIM settings on top of the model's own schedule, whatever scheduler class it shipped with
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.scheduler.config.steps_offset == 1


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_sampling_with_the_edit_off_equals_the_diffusers_pipeline(pipe, dog_image, guidance):
    picture = dog_image.resize((size_of(pipe),) * 2)
    result = edit(pipe, picture, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=guidance, num_steps=STEPS)
    x_t = result.stages.inversion.latent
    ours = sample(pipe, result.stages.inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    side = size_of(pipe)
    theirs = pipe(prompt=PROMPT, latents=x_t.clone(), num_inference_steps=STEPS, guidance_scale=guidance,
                  height=side, width=side, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.equal(ours, x_t)  # sampling moved the latent


def test_sampling_with_a_negative_prompt_equals_the_diffusers_pipeline(pipe, dog_image):
    """The inversion's unconditional conditioning is what the pipeline's negative prompt becomes."""
    from dataclasses import replace

    picture = dog_image.resize((size_of(pipe),) * 2)
    result = edit(pipe, picture, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=5.0, num_steps=STEPS)
    inversion = replace(result.stages.inversion, unconditional=family_of(pipe).encode_prompt("a blurry photo"))
    ours = sample(pipe, inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    side = size_of(pipe)
    theirs = pipe(prompt=PROMPT, negative_prompt="a blurry photo", latents=inversion.latent.clone(),
                  num_inference_steps=STEPS, guidance_scale=5.0, height=side, width=side,
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_generating_equals_the_diffusers_pipeline_from_the_same_noise(pipe, guidance):
    """The page's "generate, then edit" input: our text-to-image loop is the pipeline's."""
    import numpy as np

    from nonrigid.stages.sampling import generate

    side = size_of(pipe)
    ours = generate(family_of(pipe), PROMPT, seed=5, num_steps=STEPS, guidance_scale=guidance)
    noise = family_of(pipe).initial_noise(side, torch.Generator().manual_seed(5))
    theirs = pipe(prompt=PROMPT, latents=noise, num_inference_steps=STEPS, guidance_scale=guidance, height=side,
                  width=side).images[0]
    assert ours.size == (side, side)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def oracle_inversion(pipe, x0: torch.Tensor, prompt: str, steps: int) -> torch.Tensor:
    """DDIM inversion at guidance 1 written against diffusers alone: its inverse scheduler, its prompt encoding,
    its size conditioning."""
    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    kwargs = {}
    if isinstance(pipe, StableDiffusionXLPipeline):
        tokens, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        side = x0.shape[-1] * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), dtype=tokens.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    else:
        tokens, _ = pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)
    x, path = x0, [x0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t, encoder_hidden_states=tokens, **kwargs).sample, t, x).prev_sample
            path.append(x)
    return torch.cat(path)


def test_ddim_inversion_equals_a_loop_over_diffusers_inverse_scheduler(pipe, dog_image):
    family = family_of(pipe)
    x0 = family.encode_image(dog_image.resize((size_of(pipe),) * 2))
    ours = invert_latents(family, x0, family.encode_prompt(PROMPT), STEPS)[0]
    torch.testing.assert_close(ours, oracle_inversion(pipe, x0, PROMPT, STEPS), atol=1e-5, rtol=0)


def test_text_optimization_regresses_the_model_own_target(pipe):
    """v models learn ``v = sqrt(abar) eps - sqrt(1 - abar) x0``; epsilon models the noise."""
    family = family_of(pipe)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    noisy, target = family.training_example(x0, noise, t)
    abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if "v_prediction" in family.describe() else noise
    torch.testing.assert_close(target, expected)
    # and the noise estimate of a perfect prediction is the noise, whatever the prediction type
    torch.testing.assert_close(family.noise_estimate(target, noisy, t), noise, atol=1e-5, rtol=0)


def test_sdxl_conditioning_has_tokens_and_pooled_and_unconditional_is_zero():
    pipe = load_pipeline("tiny-sdxl", device="cpu", dtype="fp32")
    family = family_of(pipe)
    cond = family.encode_prompt(PROMPT)
    assert set(cond.tensors) == {"tokens", "pooled"}
    assert cond.tokens.shape == (1, 77, 16 + 32) and cond.tensors["pooled"].shape == (1, 32)
    uncond = family.unconditional()
    assert all(float(t.abs().max()) == 0 for t in uncond.tensors.values())  # force_zeros_for_empty_prompt
    latents = torch.zeros(3, 4, 8, 12)
    assert family.time_ids(latents).tolist() == [[64, 96, 0, 0, 64, 96]] * 3


def test_a_method_refuses_a_family_it_cannot_apply_to_in_one_line(monkeypatch, dog_image):
    """The catalogue says which families a method applies to; run_method refuses the others before any work."""
    from dataclasses import replace

    from nonrigid import run_method
    from nonrigid.errors import UsageError
    from nonrigid.methods import catalogue

    restricted = replace(catalogue.NTI, requires=("attention-maps", "v"), why_not="it needs SD's single text encoder")
    monkeypatch.setitem(catalogue.METHODS, "nti", restricted)
    pipe = load_pipeline("tiny-sdxl", device="cpu", dtype="fp32")
    with pytest.raises(UsageError, match=r"^method 'nti' does not apply to this model \(SDXL layout.*single text") \
            as refused:
        run_method(pipe, dog_image, PROMPT, "nti", {"num_steps": 2})
    assert "\n" not in str(refused.value)


def test_family_defaults_pick_size_and_guidance_unless_told(dog_image):
    """`edit` on SDXL samples at SDXL's guidance (5) and native size; explicit values win."""
    pipe = load_pipeline("tiny-sdxl", device="cpu", dtype="fp32")
    result = edit(pipe, dog_image, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, num_steps=2, inner_steps=0)
    assert result.stages.inversion.guidance_scale == 5.0 and result.input_image.size == (64, 64)
    told = edit(pipe, dog_image, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, num_steps=2, inner_steps=0,
                guidance_scale=7.5, size=128)
    assert told.stages.inversion.guidance_scale == 7.5 and told.input_image.size == (128, 128)
    sd = load_pipeline("tiny-sd2-v", device="cpu", dtype="fp32")
    assert edit(sd, dog_image, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, num_steps=2,
                inner_steps=0).input_image.size == (96, 96)


def test_masactrl_counts_sdxl_self_attention_layers_as_the_reference():
    """70 self-attention layers in SDXL base's UNet in forward order (24 down, 10 mid, 36 up), 16 in SD 1.x's; the
    default start layer keeps the reference's relative depth: 10 of 16, 44 of 70 (inside the decoder)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from nonrigid.methods.masactrl import scaled_start_layer, self_attention_layers

    sdxl = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, sample_size=128)
    with init_empty_weights():  # the architecture only: no 10 GB of weights
        unets = {"sdxl": UNet2DConditionModel(**sdxl), "sd1": UNet2DConditionModel(cross_attention_dim=768)}
    layers = self_attention_layers(unets["sdxl"])
    parts = [name.split(".")[0] for name in layers]
    assert (len(layers), parts.count("down_blocks"), parts.count("mid_block"), parts.count("up_blocks")) == (
        70, 24, 10, 36)
    assert parts == sorted(parts, key=["down_blocks", "mid_block", "up_blocks"].index)
    assert scaled_start_layer(unets["sdxl"]) == 44 and layers[44].startswith("up_blocks.0")
    assert len(self_attention_layers(unets["sd1"])) == 16 and scaled_start_layer(unets["sd1"]) == 10


# ---- schedules from any scheduler config (a default EulerDiscreteScheduler says "linspace", steps_offset 0)


@pytest.mark.parametrize("kind", ["tiny", "tiny-sd2-v", "tiny-sdxl"])
@pytest.mark.parametrize(("spacing", "offset"), [("leading", 1), ("leading", 0), ("trailing", 0), ("trailing", 1),
                                                  ("linspace", 0), ("linspace", 1)])
def test_the_inverse_walk_is_the_sampling_walk_reversed_whatever_the_spacing(kind, spacing, offset):
    from diffusers import EulerDiscreteScheduler

    pipe = load_pipeline(kind, device="cpu", dtype="fp32")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing,
                                                        steps_offset=offset)
    family = family_of(pipe)
    family.adopt_scheduler(kind)  # what loading does with the model's own scheduler
    for steps in (STEPS, 50):
        sampling, inverse = family.sampling_scheduler(steps), family.inversion_scheduler(steps)
        assert sampling.config.timestep_spacing == spacing
        torch.testing.assert_close(inverse.timesteps, sampling.timesteps.flip(0), rtol=0, atol=0)
        if spacing != "linspace":  # diffusers' inverse scheduler has these spacings itself: the same walk
            own = DDIMInverseScheduler.from_config(inverse.config, timestep_spacing=spacing)
            own.set_timesteps(steps)
            torch.testing.assert_close(inverse.timesteps, own.timesteps, rtol=0, atol=0)
        if family.prediction_type != "epsilon":
            continue  # (a v output means another noise estimate at another x_t: no exact round trip to check)
        # each inverse step undoes the sampling step of its timestep (same noise estimate): the same pair of
        # noise levels in both directions, the final one included
        g = torch.Generator().manual_seed(0)
        x, eps = torch.randn(2, 1, 4, 8, 8, generator=g)
        for t in sampling.timesteps:
            back = inverse.step(eps, t, sampling.step(eps, t, x).prev_sample).prev_sample
            torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
