"""MasaCtrl (mutual self-attention on an NTI inversion) and LEDITS++ (diffusers' pipeline) on the tiny model.

Exact properties: MasaCtrl with no controlled step is NTI editing, its source branch is the NTI reconstruction, a
sweep equals its values run alone, a target that equals the source is left unchanged by the control (so each CFG
half reads its own half's source), and the attention processor objects are restored, also after an error.
LEDITS++ is deterministic per seed, reuses one inversion per seed for every scale, and leaves the pipeline as it
found it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nonrigid import invert, run_method
from nonrigid.errors import UsageError
from nonrigid.methods.ledits import supports_attention_mask
from nonrigid.methods.masactrl import (
    MutualAttentionState,
    MutualSelfAttentionProcessor,
    masactrl_latents,
    mutual_self_attention,
    self_attention_layers,
)
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache
from nonrigid.stages.sampling import sample_latents

N = 4  # sampling steps
PROMPT = "a photo of a jumping dog"
ATOL = 2e-4  # a batch of 2 vs 4 rows differs in the last bits (latents are of order 1..10)
LEDITS_PARAMS = {"num_steps": 4, "edit_guidance": (5.0, 10.0), "mask": "noise"}

# diffusers' DPM-Solver builds its sigmas from a tensor with np.array (harmless under numpy 2)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def inversion(tiny_pipe, dog_image):
    return invert(tiny_pipe, dog_image, "a dog", method="nti", num_steps=N, inner_steps=2)


@pytest.fixture(scope="module")
def target(tiny_pipe):
    return family_of(tiny_pipe).encode_prompt(PROMPT).tokens


@pytest.fixture(scope="module")
def plain(tiny_pipe, inversion, target):
    """NTI editing: the target sampled from the inversion with no control."""
    return sample_latents(family_of(tiny_pipe), [inversion], target, [0], [0])[0]


def processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


def assert_same_objects(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert all(after[name] is before[name] for name in before)


class RaiseOnUnetCall:
    """A forward pre-hook that raises on the n-th UNet call, noting the processors installed at that moment."""

    def __init__(self, call: int):
        self.call, self.calls, self.seen = call, 0, None

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.call:
            self.seen = dict(module.attn_processors)
            raise RuntimeError("boom")


def run_raising(pipe, hook: RaiseOnUnetCall, action) -> None:
    handle = pipe.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            action()
    finally:
        handle.remove()


# ---------------------------------------------------------------- MasaCtrl


def test_self_attention_layers_are_listed_in_the_order_the_unet_calls_them(tiny_pipe, inversion, target):
    names = self_attention_layers(tiny_pipe.unet)
    called: list[str] = []
    handles = [tiny_pipe.unet.get_submodule(name.removesuffix(".processor")).register_forward_pre_hook(
        lambda module, args, name=name: called.append(name)) for name in names]
    try:
        sample_latents(family_of(tiny_pipe), [inversion], target, [N - 1], [0])  # one UNet call
    finally:
        for handle in handles:
            handle.remove()
    assert called == names
    assert [n.split(".")[0] for n in names] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]


def test_state_maps_each_target_row_to_the_source_row_of_its_own_guidance_half():
    state = MutualAttentionState(start_steps=(0, 2))  # blocks of 3 rows: source, target from 0, target from 2
    state.step = 1
    assert state.key_value_rows(6) == [0, 0, 2, 3, 3, 5]
    state.step = 2
    assert state.key_value_rows(6) == [0, 0, 0, 3, 3, 3]
    assert state.key_value_rows(3) == [0, 0, 0]  # guidance 1: one block
    assert MutualAttentionState(start_steps=(5,), step=4).key_value_rows(4) is None
    with pytest.raises(ValueError):
        state.key_value_rows(4)


def test_no_controlled_step_equals_nti_editing_and_source_branch_is_the_reconstruction(tiny_pipe, inversion, target,
                                                                                         plain):
    latents = masactrl_latents(family_of(tiny_pipe), inversion, target, [N, N + 5], start_layer=0)
    assert latents.shape == (3, *inversion.latent.shape[1:])
    torch.testing.assert_close(latents[1], plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(latents[2], plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(latents[0], inversion.reconstruction[-1], atol=ATOL, rtol=0)


def test_mutual_attention_changes_the_target_but_not_the_source(tiny_pipe, inversion, target, plain):
    latents = masactrl_latents(family_of(tiny_pipe), inversion, target, [0], start_layer=0)
    assert (latents[1] - plain).abs().max() > 100 * ATOL
    torch.testing.assert_close(latents[0], inversion.reconstruction[-1], atol=ATOL, rtol=0)
    last_layer_only = masactrl_latents(family_of(tiny_pipe), inversion, target, [0], start_layer=3)
    assert (last_layer_only[1] - plain).abs().max() > 100 * ATOL
    assert (last_layer_only[1] - latents[1]).abs().max() > 100 * ATOL


def test_a_target_identical_to_the_source_is_unchanged_by_mutual_attention(tiny_pipe, inversion):
    """Each CFG half must read its own half's source: reading the other half's would change this branch."""
    latents = masactrl_latents(family_of(tiny_pipe), inversion, inversion.source_embedding, [0], start_layer=0)
    torch.testing.assert_close(latents[1], latents[0], atol=ATOL, rtol=0)


def test_a_batched_sweep_equals_each_start_step_alone(tiny_pipe, inversion, target):
    sweep = [0, 2, N]
    batched = masactrl_latents(family_of(tiny_pipe), inversion, target, sweep, start_layer=0)
    chunked = masactrl_latents(family_of(tiny_pipe), inversion, target, sweep, start_layer=0, batch_size=3)
    torch.testing.assert_close(chunked, batched, atol=ATOL, rtol=0)
    for row, step in enumerate(sweep, start=1):
        alone = masactrl_latents(family_of(tiny_pipe), inversion, target, [step], start_layer=0)
        torch.testing.assert_close(batched[row], alone[1], atol=ATOL, rtol=0)
    assert (batched[1] - batched[3]).abs().max() > 100 * ATOL  # the sweep values give different results


def test_processors_are_the_same_objects_after_an_edit_and_after_an_error_inside_it(tiny_pipe, inversion, target):
    before = processors(tiny_pipe)
    masactrl_latents(family_of(tiny_pipe), inversion, target, [0, 2], start_layer=1)
    assert_same_objects(before, processors(tiny_pipe))

    hook = RaiseOnUnetCall(call=2)
    run_raising(tiny_pipe, hook, lambda: masactrl_latents(family_of(tiny_pipe), inversion, target, [0], start_layer=1))
    assert_same_objects(before, processors(tiny_pipe))
    names = self_attention_layers(tiny_pipe.unet)
    assert hook.seen[names[0]] is before[names[0]]  # below start_layer: untouched
    for name in names[1:]:
        assert isinstance(hook.seen[name], MutualSelfAttentionProcessor)
        assert hook.seen[name].original is before[name]

    with pytest.raises(KeyError), mutual_self_attention(tiny_pipe.unet, MutualAttentionState((0,)), 0):
        raise KeyError("inside the context")
    assert_same_objects(before, processors(tiny_pipe))


def test_start_layer_past_the_models_self_attention_layers_is_a_usage_error(tiny_pipe, dog_image):
    with pytest.raises(UsageError, match=r"start_layer=4 .*it has 4"):
        run_method(tiny_pipe, dog_image, PROMPT, "masactrl", params={"start_layer": 4, "num_steps": 2}, size=64)


def test_masactrl_runs_end_to_end_and_its_uncontrolled_variant_is_the_nti_edit(tiny_pipe, dog_image, tmp_path):
    cache = StageCache(tmp_path)
    before = processors(tiny_pipe)
    common = {"num_steps": N, "inner_steps": 1}
    result = run_method(tiny_pipe, dog_image, PROMPT, "masactrl", params={**common, "start_step": (0, N),
                        "start_layer": 0}, seeds=(3, 5), size=64, cache=cache)
    assert_same_objects(before, processors(tiny_pipe))
    assert [v.knobs for v in result.variants] == [{"step": 0}, {"step": N}]
    assert [v.seed for v in result.variants] == [3, 3]  # deterministic: runs once, for the first seed
    assert all(v.image.size == (64, 64) for v in result.variants)
    assert result.cache == {"inversion": False}
    assert result.record["controlled_layers"] == 4
    assert result.record["start_steps_without_control"] == [N]

    nti = run_method(tiny_pipe, dog_image, PROMPT, "nti", params=common, size=64, cache=cache)
    assert nti.cache == {"inversion": True}  # the same cached NTI inversion
    uncontrolled, controlled = (np.asarray(v.image).astype(int) for v in reversed(result.variants))
    reference = np.asarray(nti.variants[0].image).astype(int)
    assert np.abs(uncontrolled - reference).max() <= 1
    assert np.abs(controlled - reference).max() > 10


# ---------------------------------------------------------------- LEDITS++


def pipe_state(pipe) -> dict:
    return {
        "processors": processors(pipe),
        "scheduler": pipe.scheduler,
        "scheduler_config": dict(pipe.scheduler.config),
        "timesteps": pipe.scheduler.timesteps.clone(),
        "num_inference_steps": pipe.scheduler.num_inference_steps,
        "unet_config": pipe.unet.config,
        "weights": {f"{name}.{key}": value.detach().clone() for name in ("unet", "vae", "text_encoder")
                    for key, value in getattr(pipe, name).state_dict().items()},
    }


def assert_pipe_unchanged(pipe, before: dict) -> None:
    after = pipe_state(pipe)
    assert_same_objects(before["processors"], after["processors"])
    assert after["scheduler"] is before["scheduler"]
    assert after["scheduler_config"] == before["scheduler_config"]
    assert torch.equal(after["timesteps"], before["timesteps"])
    assert after["num_inference_steps"] == before["num_inference_steps"]
    assert after["unet_config"] is before["unet_config"]
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])


def pixels(variant) -> np.ndarray:
    return np.asarray(variant.image).astype(int)


@pytest.fixture(scope="module")
def ledits_two_seeds(tiny_pipe, dog_image):
    before = pipe_state(tiny_pipe)
    result = run_method(tiny_pipe, dog_image, PROMPT, "ledits", params=LEDITS_PARAMS, seeds=(0, 1), size=64,
                        source_prompt="a dog")
    return before, result


def test_ledits_runs_end_to_end_with_one_variant_per_seed_and_scale(ledits_two_seeds):
    _, result = ledits_two_seeds
    assert [(v.seed, v.knobs) for v in result.variants] == [
        (0, {"edit": 5.0}), (0, {"edit": 10.0}), (1, {"edit": 5.0}), (1, {"edit": 10.0})]
    assert all(v.image.size == (64, 64) and v.image.mode == "RGB" for v in result.variants)
    assert result.knob_labels == ("edit",)
    first, stronger, other_seed, _ = (pixels(v) for v in result.variants)
    assert np.abs(first - stronger).max() > 10  # the scale reaches the pipeline
    assert np.abs(first - other_seed).max() > 10  # so does the seed (the inversion's noise)


def test_ledits_leaves_the_pipeline_as_it_found_it(tiny_pipe, ledits_two_seeds):
    before, _ = ledits_two_seeds
    assert_pipe_unchanged(tiny_pipe, before)


def test_ledits_is_deterministic_and_one_inversion_serves_every_scale(tiny_pipe, dog_image, ledits_two_seeds):
    """Seed 1 alone, scales in the other order: the same images as in the two-seed run (no state leaks)."""
    _, result = ledits_two_seeds
    again = run_method(tiny_pipe, dog_image, PROMPT, "ledits", seeds=(1,), size=64, source_prompt="a dog",
                       params={**LEDITS_PARAMS, "edit_guidance": (10.0, 5.0)})
    assert [v.knobs for v in again.variants] == [{"edit": 10.0}, {"edit": 5.0}]
    assert np.array_equal(pixels(again.variants[0]), pixels(result.variants[3]))
    assert np.array_equal(pixels(again.variants[1]), pixels(result.variants[2]))


def test_ledits_restores_the_attention_processors_after_an_error(tiny_pipe, dog_image):
    before = pipe_state(tiny_pipe)
    hook = RaiseOnUnetCall(call=N + 1)  # the first call of the edit, after the inversion's N calls
    run_raising(tiny_pipe, hook, lambda: run_method(tiny_pipe, dog_image, PROMPT, "ledits", params=LEDITS_PARAMS,
                                                    size=64))
    assert any(hook.seen[name] is not before["processors"][name] for name in hook.seen)  # LEDITS++ had its own
    assert_pipe_unchanged(tiny_pipe, before)


def test_ledits_refuses_what_it_cannot_do_before_touching_the_pipeline(tiny_pipe, dog_image):
    """The tiny UNet has cross-attention only at full latent resolution: no map for LEDITS++'s mask to read."""
    assert not supports_attention_mask(tiny_pipe.unet)
    before = pipe_state(tiny_pipe)
    for mask in ("intersect", "attention"):
        with pytest.raises(UsageError, match="use mask=noise"):
            run_method(tiny_pipe, dog_image, PROMPT, "ledits", params={**LEDITS_PARAMS, "mask": mask}, size=64)
    with pytest.raises(UsageError, match="multiple of 32"):
        run_method(tiny_pipe, dog_image, PROMPT, "ledits", params=LEDITS_PARAMS, size=48)
    assert_pipe_unchanged(tiny_pipe, before)


def test_ledits_attention_masks_work_on_a_unet_with_quarter_resolution_cross_attention(model, model_image):
    assert supports_attention_mask(model.unet)
    before = processors(model)
    results = {mask: run_method(model, model_image, "a photo", "ledits", size=64,
                                params={**LEDITS_PARAMS, "edit_guidance": (10.0,), "mask": mask})
               for mask in ("intersect", "noise")}
    assert_same_objects(before, processors(model))
    assert all(r.variants[0].image.size == (64, 64) for r in results.values())
    assert np.abs(pixels(results["intersect"].variants[0]) - pixels(results["noise"].variants[0])).max() > 0
