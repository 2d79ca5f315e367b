"""Imagic baseline: exact properties on the tiny random model (fine-tuning stays in its copy, batching, cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nonrigid import optimize_text, run_method
from nonrigid.images import load_image
from nonrigid.methods.imagic import (
    finetune_unet,
    imagic_latents,
    imagic_sample,
    seed_generator,
    stage_a_latent_generator,
)
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache

PROMPT = "a photo of a jumping dog"
ALPHAS = (0.8, 1.0, 1.2)
SMALL = {"opt_steps": 3, "finetune_steps": 3, "num_steps": 4, "alphas": ALPHAS}
# A learning rate large enough that fine-tuning visibly moves the tiny model's weights, so that any fine-tuning
# that leaked into the pipeline would change later results far beyond rounding.
LEAKY_LR = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two spinning threads make these tiny runs ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cat_image(tedbench):
    return load_image(tedbench / "originals" / "cat.jpeg", size=64)


@pytest.fixture(scope="module")
def dog_text(tiny_pipe, dog_image):
    return optimize_text(tiny_pipe, dog_image, PROMPT, steps=3, seed=0)


def snapshot(pipe) -> dict[str, tuple[torch.Tensor, torch.dtype, torch.device, bool]]:
    """Every weight and buffer of the three networks with its dtype, device and requires_grad."""
    state = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        flags = {key: p.requires_grad for key, p in module.named_parameters()}
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = (value.detach().clone(), value.dtype, value.device, flags.get(key, False))
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, (tensor, dtype, device, grad) in before.items():
        tensor2, dtype2, device2, grad2 = after[key]
        assert (dtype2, device2, grad2) == (dtype, device, grad), key
        assert torch.equal(tensor, tensor2), f"{key} changed"


def edit_latents(pipe, picture, seed: int = 0, **overrides):
    """Stage A, then Imagic's fine-tuning and sampling for one seed, all on ``pipe``."""
    text = optimize_text(pipe, picture, PROMPT, steps=3, seed=seed)
    settings = {"finetune_steps": 3, "finetune_lr": LEAKY_LR, "guidance_scale": 7.5, "num_steps": 4, **overrides}
    return imagic_latents(family_of(pipe), picture, text, ALPHAS, **settings)


def test_edit_leaves_the_pipeline_bit_identical_and_the_same_objects(tiny_pipe, dog_image):
    before = snapshot(tiny_pipe)
    unet, processors = tiny_pipe.unet, dict(tiny_pipe.unet.attn_processors)
    params = {**SMALL, "finetune_lr": LEAKY_LR}
    run_method(tiny_pipe, dog_image, PROMPT, "imagic", params=params, size=64, seeds=(0,))
    assert tiny_pipe.unet is unet
    assert_same_state(before, snapshot(tiny_pipe))
    assert all(p.grad is None for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder)
               for p in m.parameters())
    assert not tiny_pipe.unet.training
    assert dict(tiny_pipe.unet.attn_processors) == processors
    assert tiny_pipe.scheduler.num_inference_steps is None, "the pipeline's own scheduler must stay unset"


def test_parking_the_original_unet_restores_it_exactly(tiny_pipe, dog_image, dog_text):
    """The memory-saving path (original UNet parked while the copy trains) forced on, on the CPU."""
    before = snapshot(tiny_pipe)
    parameters = list(tiny_pipe.unet.parameters())
    finetune_unet(family_of(tiny_pipe), dog_image, dog_text.optimized_embedding, 2, LEAKY_LR,
                  seed_generator(0, "finetune"), park_device="cpu")
    assert all(a is b for a, b in zip(parameters, tiny_pipe.unet.parameters(), strict=True))
    assert_same_state(before, snapshot(tiny_pipe))


def test_half_precision_pipeline_trains_an_fp32_copy_and_keeps_its_own_dtype(dog_image):
    pipe = load_pipeline("tiny", device="cpu", dtype="bf16")
    before = snapshot(pipe)
    text = optimize_text(pipe, dog_image, PROMPT, steps=1, seed=0)
    unet, losses = finetune_unet(family_of(pipe), dog_image, text.optimized_embedding, 2, LEAKY_LR,
                                 seed_generator(0, "f"))
    assert unet.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16
    assert len(losses) == 2
    assert_same_state(before, snapshot(pipe))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: parks the fp16 UNet on the CPU and back")
def test_cuda_fp16_edit_restores_the_unet_device_dtype_and_bits(dog_image):
    pipe = load_pipeline("tiny", device="cuda", dtype="fp16")
    before = snapshot(pipe)
    unet = pipe.unet
    run_method(pipe, dog_image, PROMPT, "imagic", params={**SMALL, "finetune_lr": LEAKY_LR}, size=64)
    assert pipe.unet is unet and pipe.unet.device.type == "cuda" and pipe.unet.dtype == torch.float16
    assert_same_state(before, snapshot(pipe))


def test_two_edits_in_a_row_equal_each_edit_alone_in_a_fresh_pipeline(dog_image, cat_image):
    """Catches fine-tuned weights leaking into the pipeline (and so into the next edit)."""
    def fresh():
        return load_pipeline("tiny", device="cpu", dtype="fp32")

    dog_alone = edit_latents(fresh(), dog_image)
    cat_alone = edit_latents(fresh(), cat_image)
    shared = fresh()
    dog_first = edit_latents(shared, dog_image)
    cat_second = edit_latents(shared, cat_image)
    assert torch.equal(dog_first.latents, dog_alone.latents)
    assert torch.equal(cat_second.latents, cat_alone.latents)
    assert cat_second.finetune_losses == cat_alone.finetune_losses

    # The comparison is sensitive: had the dog's fine-tuned weights stayed in the pipeline, the cat would differ.
    text = optimize_text(shared, dog_image, PROMPT, steps=3, seed=0)
    tuned, _ = finetune_unet(family_of(shared), dog_image, text.optimized_embedding, 3, LEAKY_LR,
                             seed_generator(0, "finetune"), latent_generator=stage_a_latent_generator(0))
    leaked = fresh()
    leaked.unet.load_state_dict(tuned.state_dict())
    assert not torch.equal(edit_latents(leaked, cat_image).latents, cat_alone.latents)


def test_finetuning_moves_the_copy_and_lowers_the_denoising_loss(tiny_pipe, dog_image, dog_text):
    steps = 20
    unet, losses = finetune_unet(family_of(tiny_pipe), dog_image, dog_text.optimized_embedding, steps, LEAKY_LR,
                                 seed_generator(0, "finetune"), latent_generator=stage_a_latent_generator(0))
    assert unet is not tiny_pipe.unet and unet.dtype == torch.float32 and not unet.training
    assert all(not p.requires_grad and p.grad is None for p in unet.parameters())
    original = dict(tiny_pipe.unet.named_parameters())
    changed = [name for name, p in unet.named_parameters() if not torch.equal(p, original[name])]
    assert len(changed) == len(original)
    assert len(losses) == steps and all(np.isfinite(losses))
    # On fixed held-out draws (same latent sample, other t and noise) the copy denoises the image better.
    x0 = family_of(tiny_pipe).encode_image(dog_image, generator=stage_a_latent_generator(0))
    scheduler = family_of(tiny_pipe).sampling_scheduler(1)
    generator = torch.Generator().manual_seed(1234)
    timesteps = torch.randint(0, 1000, (16,), generator=generator)
    noise = torch.randn((16, *x0.shape[1:]), generator=generator)
    noisy = scheduler.add_noise(x0.expand(16, -1, -1, -1), noise, timesteps)
    condition = dog_text.optimized_embedding.expand(16, -1, -1)

    def held_out_loss(model) -> float:
        with torch.no_grad():
            return ((model(noisy, timesteps, encoder_hidden_states=condition).sample - noise) ** 2).mean().item()

    assert held_out_loss(unet) < 0.9 * held_out_loss(tiny_pipe.unet)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_zero_finetuning_steps_samples_exactly_like_the_frozen_unet(tiny_pipe, dog_image, dog_text):
    result = imagic_latents(family_of(tiny_pipe), dog_image, dog_text, ALPHAS, finetune_steps=0, finetune_lr=LEAKY_LR,
                            guidance_scale=7.5, num_steps=4)
    frozen = imagic_sample(family_of(tiny_pipe), tiny_pipe.unet, dog_text, ALPHAS, 7.5, 4, seed_generator(0, "noise"))
    assert result.finetune_losses == []
    assert torch.equal(result.latents, frozen)
    tuned = imagic_latents(family_of(tiny_pipe), dog_image, dog_text, ALPHAS, finetune_steps=3, finetune_lr=LEAKY_LR,
                           guidance_scale=7.5, num_steps=4)
    assert not torch.allclose(tuned.latents, frozen, atol=1e-3)


def test_batched_alphas_equal_each_alpha_alone(tiny_pipe, dog_text):
    batched = imagic_sample(family_of(tiny_pipe), tiny_pipe.unet, dog_text, ALPHAS, 7.5, 4, seed_generator(0, "noise"))
    assert batched.shape == (len(ALPHAS), 4, 8, 8)
    for row, alpha in enumerate(ALPHAS):
        alone = imagic_sample(family_of(tiny_pipe), tiny_pipe.unet, dog_text, (alpha,), 7.5, 4,
                              seed_generator(0, "noise"))
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-4, rtol=0)
    chunked = imagic_sample(family_of(tiny_pipe), tiny_pipe.unet, dog_text, ALPHAS, 7.5, 4, seed_generator(0, "noise"),
                            batch_size=2)
    torch.testing.assert_close(chunked, batched, atol=1e-4, rtol=0)
    # alpha matters, and so does the seed's noise
    assert (batched[0] - batched[2]).abs().max() > 1e-3
    other_seed = imagic_sample(family_of(tiny_pipe), tiny_pipe.unet, dog_text, ALPHAS, 7.5, 4,
                               seed_generator(1, "noise"))
    assert (other_seed - batched).abs().max() > 1e-2


def test_run_method_end_to_end_variants_record_and_cached_stage_a(tiny_pipe, dog_image, tmp_path):
    cache = StageCache(tmp_path)
    first = run_method(tiny_pipe, dog_image, PROMPT, "imagic", params=SMALL, size=64, seeds=(0, 1), cache=cache)
    assert [(v.seed, v.knobs) for v in first.variants] == [(s, {"alpha": a}) for s in (0, 1) for a in ALPHAS]
    assert all(v.image.size == (64, 64) and v.image.mode == "RGB" for v in first.variants)
    assert first.knob_labels == ("alpha",)
    assert first.cache == {"text_optimization": []}
    assert {s: len(c) for s, c in first.record["finetune_losses"].items()} == {0: 3, 1: 3}
    assert first.record["finetune_losses"][0] != first.record["finetune_losses"][1]
    assert {"text_optimization", "finetuning", "sampling", "total"} <= first.timings.keys()

    second = run_method(tiny_pipe, dog_image, PROMPT, "imagic", params=SMALL, size=64, seeds=(0, 1), cache=cache)
    assert second.cache == {"text_optimization": [0, 1]}
    for a, b in zip(first.variants, second.variants, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert second.record == first.record
