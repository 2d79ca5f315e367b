"""Methods on the SD3 (rectified-flow) family: FlowEdit against an independent re-computation of its update rule
and its invariants, which baselines run through the seam, and which refuse in one line.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nonrigid import run_method
from nonrigid.errors import UsageError
from nonrigid.methods.catalogue import METHODS
from nonrigid.methods.flowedit import flowedit_latents
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of

SOURCE = "a photo of a sitting dog"
TARGET = "a photo of a jumping dog"
SIDE = 64


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-sd3", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def x_src(pipe, dog_image):
    return family_of(pipe).encode_image(dog_image.resize((SIDE, SIDE)))


def reference_flowedit(pipe, x_src, steps, n_max, n_avg, src_w, tar_w, seed):
    """FlowEdit's SD3 loop written against diffusers alone (the authors' ``FlowEditSD3`` with n_min 0): the
    pipeline's prompt encoding with "" as the negative prompt, its transformer on the four-way CFG batch, sigmas
    from its scheduler set as the pipeline sets it; noise drawn per step and average from one CPU generator."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    src, src_neg, src_pooled, src_neg_pooled = pipe.encode_prompt(SOURCE, None, None, device="cpu",
                                                                  negative_prompt="")
    tar, tar_neg, tar_pooled, tar_neg_pooled = pipe.encode_prompt(TARGET, None, None, device="cpu",
                                                                  negative_prompt="")
    embeds = torch.cat([src_neg, src, tar_neg, tar])
    pooled = torch.cat([src_neg_pooled, src_pooled, tar_neg_pooled, tar_pooled])
    generator = torch.Generator().manual_seed(seed)
    z = x_src.clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            noises = [torch.randn(x_src.shape[1:], generator=generator)[None] for _ in range(n_avg)]
            if steps - i > n_max:
                continue
            s, s_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
            v_delta = torch.zeros_like(x_src)
            for noise in noises:
                zt_src = (1 - s) * x_src + s * noise
                zt_tar = z + zt_src - x_src
                v = pipe.transformer(hidden_states=torch.cat([zt_src, zt_src, zt_tar, zt_tar]),
                                     timestep=t.expand(4), encoder_hidden_states=embeds,
                                     pooled_projections=pooled).sample
                su, sc, tu, tc = v.chunk(4)
                v_delta += ((tu + tar_w * (tc - tu)) - (su + src_w * (sc - su))) / n_avg
            z = z + (s_next - s) * v_delta
    return z


@pytest.mark.parametrize(("n_max", "n_avg"), [(4, 1), (3, 2)])
def test_flowedit_equals_its_update_rule_written_against_diffusers(pipe, x_src, n_max, n_avg):
    family = family_of(pipe)
    ours = flowedit_latents(family, x_src, family.encode_prompt(SOURCE), family.encode_prompt(TARGET), (n_max,),
                            num_steps=5, n_avg=n_avg, source_guidance=3.5, target_guidance=13.5, seed=3)
    theirs = reference_flowedit(pipe, x_src, 5, n_max, n_avg, 3.5, 13.5, seed=3)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert float((ours - x_src).abs().mean()) > 1e-3  # the edit moved the latent


def test_flowedit_variants_in_one_batch_equal_each_run_alone(pipe, x_src):
    family = family_of(pipe)
    source, target = family.encode_prompt(SOURCE), family.encode_prompt(TARGET)
    both = flowedit_latents(family_of(pipe), x_src, source, target, (2, 4), num_steps=5, seed=1)
    for row, n in enumerate((2, 4)):
        alone = flowedit_latents(family_of(pipe), x_src, source, target, (n,), num_steps=5, seed=1)
        torch.testing.assert_close(both[row : row + 1], alone, atol=1e-5, rtol=0)


def test_flowedit_leaves_the_image_alone_when_the_target_is_the_source(pipe, x_src):
    """Shared noise, the same prompt and guidance: the velocities cancel at every step, so z stays x_src."""
    family = family_of(pipe)
    source = family.encode_prompt(SOURCE)
    same = flowedit_latents(family_of(pipe), x_src, source, source, (5,), num_steps=5, source_guidance=4.0,
                            target_guidance=4.0, seed=0)
    torch.testing.assert_close(same, x_src, atol=1e-5, rtol=0)
    # n_max 0 edits nothing either
    none = flowedit_latents(family_of(pipe), x_src, source, family.encode_prompt(TARGET), (0,), num_steps=5)
    assert torch.equal(none, x_src)


def test_flowedit_defaults_are_the_authors_sd3_settings():
    params = {p.name: p.default for p in METHODS["flowedit"].params}
    assert params == {"n_max": (33,), "num_steps": 50, "n_min": 0, "n_avg": 1, "source_guidance": 3.5,
                      "target_guidance": 13.5}


APPLIES = {
    "ours": {"num_steps": 3, "opt_steps": 2, "inner_steps": 1, "etas": (0.0, 1.0), "inject": (0.34,)},
    "nti": {"num_steps": 3, "inner_steps": 1},
    "imagic": {"num_steps": 3, "opt_steps": 1, "finetune_steps": 1, "alphas": (1.0,)},
    "flowedit": {"num_steps": 4, "n_max": (3,)},
}


@pytest.mark.parametrize("method", list(APPLIES))
def test_methods_that_apply_run_on_sd3(pipe, dog_image, method):
    result = run_method(pipe, dog_image, TARGET, method, APPLIES[method], source_prompt=SOURCE, seeds=(0,))
    assert result.input_image.size == (SIDE, SIDE)  # the family's native size
    assert all(v.image.size == (SIDE, SIDE) for v in result.variants) and result.variants


@pytest.mark.parametrize("inversion", ["ddim", "npi"])
def test_ours_with_every_inversion_runs_on_sd3(pipe, dog_image, inversion):
    result = run_method(pipe, dog_image, TARGET, "ours", {**APPLIES["ours"], "inversion": inversion},
                        source_prompt=SOURCE)
    assert len(result.variants) == 2


@pytest.mark.parametrize("method", ["masactrl", "edit-friendly", "dds", "ledits"])
def test_unet_methods_refuse_sd3_in_one_line(pipe, dog_image, method):
    with pytest.raises(UsageError, match=rf"^method '{method}' does not apply to this model \(SD3 layout") as err:
        run_method(pipe, dog_image, TARGET, method)
    assert "\n" not in str(err.value)


def test_flowedit_refuses_a_noise_predicting_model_in_one_line(tiny_pipe, dog_image):
    with pytest.raises(UsageError, match=r"^method 'flowedit' does not apply .*DDPM noise$"):
        run_method(tiny_pipe, dog_image, TARGET, "flowedit")
