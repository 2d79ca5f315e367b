"""The instruction editors (FLUX.1 Kontext [dev], Qwen-Image-Edit, Qwen-Image-Edit-2509 / 2511) on tiny models
built in code, with diffusers' own pipelines as the oracle.

A denoising loop written with :mod:`nonrigid.models.edit_models` alone (encode the prompt and reference, then per
timestep: velocity, guidance, Euler step; then decode) must reproduce ``FluxKontextPipeline``,
``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline`` from the same initial latents: the final latents
(``output_type="latent"``) and the decoded images, bit for bit on CPU in float32.

Costs: the Qwen pipelines always encode their references at about 1024x1024 with the (3D) VAE, about a second on
one core even for the tiny VAE, so each Qwen run is computed once per module and shared.
"""

from __future__ import annotations

from unittest import mock

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import weight_differences
from diffusers import FluxKontextPipeline, FluxPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from nonrigid.models import edit_models as em
from nonrigid.models.loading import _align_storage
from nonrigid.models.tiny_edit import (
    KONTEXT_DEV_SCHEDULER_CONFIG,
    QWEN_IMAGE_EDIT_SCHEDULER_CONFIG,
    build_qwen_tokenizer,
    build_tiny_kontext,
    build_tiny_qwen_edit,
    build_tiny_qwen_edit_plus,
)

PROMPT = "make the dog jump"
STEPS = 2
KONTEXT_GUIDANCE = 2.5
QWEN_CFG = 4.0


def picture(height: int, width: int, seed: int) -> Image.Image:
    """A smooth, seeded RGB picture (a few random colour gradients), so that resizing it is well behaved."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


def initial_latents(height: int, width: int, seed: int) -> torch.Tensor:
    """Standard-normal (1, 16, h, w) latents for an image of (height, width) pixels."""
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kontext():
    pipe = build_tiny_kontext()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen_edit():
    pipe = build_tiny_qwen_edit()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen_plus():
    pipe = build_tiny_qwen_edit_plus()  # 2511
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the loops written with edit_models alone


@torch.no_grad()
def kontext_loop(pipe, x: torch.Tensor, image, guidance: float, negative: str | None = None, true_cfg: float = 1.0
                 ) -> torch.Tensor:
    cond = em.kontext_conditioning(pipe, PROMPT, image, auto_resize=False)
    uncond = None if negative is None else em.kontext_conditioning(pipe, negative, image, auto_resize=False)
    schedule = em.flow_schedule(pipe.scheduler.config, STEPS, em.pack(x).shape[1])
    for i, t in enumerate(schedule.timesteps):
        v = em.kontext_velocity(pipe.transformer, x, t, cond, guidance)
        if uncond is not None:
            v = em.true_cfg(v, em.kontext_velocity(pipe.transformer, x, t, uncond, guidance), true_cfg)
        x = em.euler_step(x, v, schedule, i)
    return x


@torch.no_grad()
def qwen_loop(pipe, x: torch.Tensor, image) -> torch.Tensor:
    cond = em.qwen_edit_conditioning(pipe, PROMPT, image, negative_prompt=em.QWEN_NEGATIVE_PROMPT)
    schedule = em.flow_schedule(pipe.scheduler.config, STEPS, em.pack(x).shape[1])
    for i, t in enumerate(schedule.timesteps):
        x = em.euler_step(x, em.qwen_guided_velocity(pipe.transformer, x, t, cond, QWEN_CFG), schedule, i)
    return x


def postprocess(pipe, latents: torch.Tensor, decode) -> np.ndarray:
    with torch.no_grad():
        return pipe.image_processor.postprocess(decode(pipe.vae, latents), output_type="np")


class FinalLatents:
    """A ``callback_on_step_end`` that keeps the latents after each step: after the last one they are what
    ``output_type="latent"`` returns, so one pipeline run gives both the latents and the decoded image."""

    def __init__(self):
        self.latents = None

    def __call__(self, pipe, step, timestep, kwargs):
        self.latents = kwargs["latents"].clone()
        return {}


def run_qwen(pipe, x: torch.Tensor, image, height: int, width: int) -> tuple[torch.Tensor, np.ndarray]:
    """The pipeline from packed ``x``, with the model card's negative prompt and CFG: (final packed latents,
    image)."""
    final = FinalLatents()
    images = pipe(image=image, prompt=PROMPT, negative_prompt=em.QWEN_NEGATIVE_PROMPT, true_cfg_scale=QWEN_CFG,
                  latents=em.pack(x), height=height, width=width, num_inference_steps=STEPS, output_type="np",
                  callback_on_step_end=final).images
    return final.latents, images


@pytest.fixture(scope="module")
def qwen_edit_runs(qwen_edit):
    """Per output size: (x_T, reference, the pipeline's final packed latents, its image, our final latents)."""
    runs = {}
    for (height, width), reference in (((64, 64), picture(64, 64, 1)), ((64, 96), picture(96, 64, 2))):
        x = initial_latents(height, width, seed=3)
        theirs, image = run_qwen(qwen_edit, x, reference, height, width)
        runs[(height, width)] = (x, reference, theirs, image, qwen_loop(qwen_edit, x, reference))
    return runs


@pytest.fixture(scope="module")
def qwen_plus_run(qwen_plus):
    """Two references of different shapes, a non-square output: as :func:`qwen_edit_runs`."""
    references = [picture(64, 96, 4), picture(80, 64, 5)]
    x = initial_latents(64, 96, seed=6)
    theirs, image = run_qwen(qwen_plus, x, references, 64, 96)
    return x, references, theirs, image, qwen_loop(qwen_plus, x, references)


# ---- (a) the tiny pipelines run end to end


def test_the_tiny_pipelines_are_the_real_layouts_and_run(kontext, qwen_edit_runs, qwen_plus_run, qwen_plus):
    assert kontext.transformer.config.guidance_embeds and kontext.transformer.config.in_channels == 64
    assert dict(kontext.scheduler.config) | KONTEXT_DEV_SCHEDULER_CONFIG == dict(kontext.scheduler.config)
    assert dict(qwen_plus.scheduler.config) | QWEN_IMAGE_EDIT_SCHEDULER_CONFIG == dict(qwen_plus.scheduler.config)
    assert qwen_plus.vae_scale_factor == 8 and qwen_plus.transformer.config.zero_cond_t
    assert not build_tiny_qwen_edit_plus(version="2509").transformer.config.zero_cond_t
    image = kontext(image=picture(48, 80, 0), prompt=PROMPT, num_inference_steps=STEPS, height=48, width=80,
                    max_area=48 * 80, _auto_resize=False, output_type="np").images
    assert image.shape == (1, 48, 80, 3)
    for *_, qwen_image, _ in (*qwen_edit_runs.values(), qwen_plus_run):
        assert np.isfinite(qwen_image).all() and qwen_image.std() > 0
    assert qwen_edit_runs[(64, 96)][3].shape == qwen_plus_run[3].shape == (1, 64, 96, 3)


def test_the_builds_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_tiny_qwen_edit(seed=0), build_tiny_qwen_edit(seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert weight_differences(a, b, ("transformer", "vae", "text_encoder")) == []
    assert weight_differences(a, build_tiny_qwen_edit(seed=1), ("transformer",)) != []
    assert weight_differences(build_tiny_kontext(), build_tiny_kontext(), ("transformer", "text_encoder_2")) == []


def test_the_qwen_tokenizer_drops_exactly_the_system_turn(qwen_edit, qwen_plus):
    """The pipelines drop the first 64 tokens: with the real vocabulary that is the system turn and
    "<|im_start|>user\\n"; the tiny tokenizer makes each piece of that text one token too."""
    assert qwen_edit.prompt_template_encode == em.QWEN_EDIT_TEMPLATE
    assert qwen_plus.prompt_template_encode == em.QWEN_EDIT_PLUS_TEMPLATE
    assert qwen_edit.prompt_template_encode_start_idx == qwen_plus.prompt_template_encode_start_idx == 64
    tokenizer = build_qwen_tokenizer()
    for template in (em.QWEN_EDIT_TEMPLATE, em.QWEN_EDIT_PLUS_TEMPLATE):
        tokens = tokenizer.tokenize(template.format("x"))
        assert tokens[em.QWEN_DROP_TOKENS - 4: em.QWEN_DROP_TOKENS] == ["Ċ", "<|im_start|>", "user", "Ċ"]
    text = em.qwen_prompt_text(PROMPT, 2, plus=True)
    assert tokenizer.decode(tokenizer(text).input_ids) == text


# ---- (b) the diffusers folder layout round-trips offline


@pytest.mark.parametrize("kind", ["kontext", "qwen_edit", "qwen_plus"])
def test_a_saved_folder_loads_back_offline_with_the_same_weights_and_output(kind, request, tmp_path, monkeypatch):
    """Bit-identical weights, tokenizer and processor, and the same output bit for bit once the loaded weights
    have storage of their own, as ``load_pipeline`` gives them on CPU (``_align_storage``: read in place from the
    safetensors buffer they are only 8-byte aligned, and CPU kernels round unaligned operands differently, by
    about 1e-7 here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = request.getfixturevalue(kind)
    pipe.save_pretrained(tmp_path)
    cls = {"kontext": FluxKontextPipeline, "qwen_edit": QwenImageEditPipeline,
           "qwen_plus": QwenImageEditPlusPipeline}[kind]
    loaded = cls.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    networks = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    assert weight_differences(pipe, loaded, networks) == []
    for name in networks:
        _align_storage(getattr(loaded, name))
    if kind == "kontext":
        x, reference = initial_latents(64, 96, seed=7), picture(64, 96, 8)
        call = {"image": reference, "prompt": PROMPT, "latents": em.pack(x), "height": 64, "width": 96,
                "max_area": 64 * 96, "_auto_resize": False, "num_inference_steps": STEPS, "output_type": "np"}
        np.testing.assert_array_equal(loaded(**call).images, pipe(**call).images)
        return
    assert type(loaded.processor) is type(pipe.processor)
    assert loaded.processor.image_processor.to_dict() == pipe.processor.image_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == loaded.processor.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    runs = request.getfixturevalue("qwen_edit_runs")[(64, 96)] if kind == "qwen_edit" else \
        request.getfixturevalue("qwen_plus_run")
    x, reference, latents, image, _ = runs
    loaded_latents, loaded_image = run_qwen(loaded, x, reference, 64, 96)
    assert torch.equal(loaded_latents, latents)
    np.testing.assert_array_equal(loaded_image, image)


# ---- (c) the oracle: a loop over edit_models equals each pipeline


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_a_kontext_loop_equals_the_kontext_pipeline(kontext, size):
    height, width = size
    assert em.kontext_output_size(height, width, max_area=height * width) == size
    x, reference = initial_latents(height, width, seed=9), picture(80, 48, 10)  # a reference of another shape
    call = {"image": reference, "prompt": PROMPT, "latents": em.pack(x), "height": height, "width": width,
            "max_area": height * width, "_auto_resize": False, "num_inference_steps": STEPS,
            "guidance_scale": KONTEXT_GUIDANCE}
    theirs = kontext(**call, output_type="latent").images
    ours = kontext_loop(kontext, x, reference, KONTEXT_GUIDANCE)
    torch.testing.assert_close(em.pack(ours), theirs, atol=0, rtol=0)
    final = FinalLatents()
    image = kontext(**call, output_type="np", callback_on_step_end=final).images
    np.testing.assert_array_equal(postprocess(kontext, ours, em.kontext_decode), image)
    assert torch.equal(final.latents, theirs)  # what the Qwen tests compare: the last step's latents


def test_kontext_true_cfg_with_a_negative_prompt_equals_the_pipeline(kontext):
    x, reference = initial_latents(64, 96, seed=11), picture(64, 96, 12)
    theirs = kontext(image=reference, prompt=PROMPT, negative_prompt="blurry", true_cfg_scale=2.0,
                     latents=em.pack(x), height=64, width=96, max_area=64 * 96, _auto_resize=False,
                     num_inference_steps=STEPS, guidance_scale=KONTEXT_GUIDANCE, output_type="latent").images
    ours = kontext_loop(kontext, x, reference, KONTEXT_GUIDANCE, negative="blurry", true_cfg=2.0)
    torch.testing.assert_close(em.pack(ours), theirs, atol=0, rtol=0)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_a_qwen_edit_loop_equals_the_qwen_edit_pipeline(qwen_edit, qwen_edit_runs, size):
    x, _, theirs, image, ours = qwen_edit_runs[size]
    torch.testing.assert_close(em.pack(ours), theirs, atol=0, rtol=0)
    np.testing.assert_array_equal(postprocess(qwen_edit, ours, em.qwen_decode), image)
    assert not torch.equal(ours, x)


def test_a_qwen_edit_plus_loop_with_two_references_equals_the_plus_pipeline(qwen_plus, qwen_plus_run):
    _, references, theirs, image, ours = qwen_plus_run
    torch.testing.assert_close(em.pack(ours), theirs, atol=0, rtol=0)
    np.testing.assert_array_equal(postprocess(qwen_plus, ours, em.qwen_decode), image)
    sizes = em.qwen_edit_sizes([r.size for r in references], plus=True, height=64, width=96)
    assert sizes.vae == [(1248, 832), (928, 1152)] and sizes.output == (96, 64)  # each reference at about 1 MP


# ---- (d) schedules, sizes and the properties the oracle relies on


@pytest.mark.parametrize("config", [KONTEXT_DEV_SCHEDULER_CONFIG, QWEN_IMAGE_EDIT_SCHEDULER_CONFIG])
def test_the_sigma_schedule_is_the_schedulers_bit_for_bit(config):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    for steps in (1, 2, 28, 50) if "shift_terminal" not in config else (2, 28, 50):
        for seq_len in (24, 256, 1024, 4096, 8192):
            scheduler = FlowMatchEulerDiscreteScheduler(**config)
            mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                                 config["base_shift"], config["max_shift"])
            assert em.dynamic_shift_mu(seq_len, scheduler.config) == mu
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            ours = em.flow_schedule(scheduler.config, steps, seq_len)
            assert torch.equal(ours.timesteps, scheduler.timesteps) and torch.equal(ours.sigmas, scheduler.sigmas)
    if "shift_terminal" in config:
        assert float(em.flow_schedule(config, 50, 4096).sigmas[-2]) == pytest.approx(0.02)
        # one step stretched to end at 0.02 is 0 / 0: diffusers' scheduler returns NaN sigmas, we refuse
        scheduler = FlowMatchEulerDiscreteScheduler(**config)
        with np.errstate(invalid="ignore"):
            scheduler.set_timesteps(sigmas=[1.0], mu=0.5)
        assert torch.isnan(scheduler.sigmas[0])
        with pytest.raises(ValueError, match="one step"):
            em.flow_schedule(config, 1, 4096)


def what_prepare_latents_gets(pipe, **call) -> tuple:
    """(the preprocessed reference image(s), height, width) the pipeline hands to ``prepare_latents``, where
    its sizing is done; the call stops there (before any VAE or transformer work)."""
    with mock.patch.object(pipe, "prepare_latents", side_effect=StopIteration) as prepare, \
            pytest.raises(StopIteration):
        pipe(**call)
    args = prepare.call_args.args
    return args[0], args[3], args[4]


def test_kontext_sizes_follow_the_pipeline(kontext):
    assert em.kontext_output_size(1024, 1024) == (1024, 1024)
    assert em.kontext_output_size(720, 1280) == (768, 1360)  # 16:9 at about 1 MP, multiples of 16
    assert em.kontext_reference_size(480, 640) == (880, 1184)  # the preferred resolution nearest 4:3
    assert em.kontext_reference_size(480, 640, auto_resize=False) == (480, 640)
    reference = picture(61, 90, 13)
    for auto_resize in (True, False):
        seen, height, width = what_prepare_latents_gets(kontext, image=reference, prompt=PROMPT,
                                                        _auto_resize=auto_resize)
        assert (height, width) == (1024, 1024)  # not the reference's aspect: the output defaults to square
        assert torch.equal(seen, em.kontext_preprocess(kontext, reference, auto_resize))
    assert seen.shape[-2:] == (48, 80)


@pytest.mark.parametrize("ratio", [0.3, 9 / 16, 0.8, 1.0, 4 / 3, 1.5, 3.0])
def test_qwen_dimensions_are_calculate_dimensions(ratio):
    for area in (em.QWEN_VAE_IMAGE_AREA, em.QWEN_PLUS_CONDITION_AREA):
        assert em.qwen_dimensions(area, ratio) == pipeline_qwenimage_edit_plus.calculate_dimensions(area, ratio)
        assert em.qwen_dimensions(area, ratio) == pipeline_qwenimage_edit.calculate_dimensions(area, ratio)[:2]


@pytest.mark.parametrize("kind", ["qwen_edit", "qwen_plus"])
def test_qwen_sizes_follow_the_pipelines(kind, request):
    """The default output size comes from the first reference (Edit) or the last one (Plus)."""
    pipe = request.getfixturevalue(kind)
    references = [picture(60, 100, 14), picture(100, 50, 15)]
    plus = kind == "qwen_plus"
    seen, height, width = what_prepare_latents_gets(pipe, image=references if plus else references[0], prompt=PROMPT)
    sizes = em.qwen_edit_sizes([r.size for r in (references if plus else references[:1])], plus)
    assert (width, height) == sizes.output == ((736, 1440) if plus else (1312, 800))
    vae_inputs = seen if plus else [seen]
    assert [tuple(t.shape[-1:-3:-1]) for t in vae_inputs] == sizes.vae
    assert sizes.condition == ([(480, 288), (256, 544)] if plus else sizes.vae)


def test_qwen_true_cfg_keeps_each_tokens_norm_and_is_the_conditional_velocity_at_scale_1():
    generator = torch.Generator().manual_seed(16)
    cond, uncond = (torch.randn(1, 16, 8, 12, generator=generator) for _ in range(2))
    torch.testing.assert_close(em.qwen_true_cfg(cond, uncond, 1.0), cond, atol=1e-6, rtol=1e-6)
    guided = em.qwen_true_cfg(cond, uncond, QWEN_CFG)
    token_norms = em.pack(guided).norm(dim=-1)
    torch.testing.assert_close(token_norms, em.pack(cond).norm(dim=-1))  # per 2x2 patch, 64 features
    assert not torch.allclose(guided.norm(dim=1), cond.norm(dim=1), atol=1e-3)  # not per pixel
    direction = em.pack(em.true_cfg(cond, uncond, QWEN_CFG))
    torch.testing.assert_close(em.pack(guided) / token_norms[..., None], direction / direction.norm(dim=-1)[..., None])


def synthetic_qwen_inputs(seed: int, reference_grids=((1, 3, 4),)):
    """A prompt encoding and references of the tiny model's widths, without running the encoders."""
    generator = torch.Generator().manual_seed(seed)
    prompt = em.QwenPrompt(torch.randn(1, 7, 32, generator=generator), None)
    tokens = sum(h * w for _, h, w in reference_grids)
    reference = em.QwenReference(torch.randn(1, tokens, 64, generator=generator), list(reference_grids))
    return torch.randn(1, 16, 8, 12, generator=generator), prompt, reference


def test_qwen_velocity_uses_the_reference_and_its_grid(qwen_plus):
    x, prompt, reference = synthetic_qwen_inputs(17, ((1, 3, 4), (1, 2, 6)))
    with torch.no_grad():
        base = em.qwen_velocity(qwen_plus.transformer, x, 500.0, prompt, reference)
        other = em.QwenReference(reference.latents.flip(1), reference.shapes)
        regridded = em.QwenReference(reference.latents, [(1, 4, 3), (1, 6, 2)])
        assert base.shape == x.shape
        assert not torch.allclose(base, em.qwen_velocity(qwen_plus.transformer, x, 500.0, prompt, other))
        assert not torch.allclose(base, em.qwen_velocity(qwen_plus.transformer, x, 500.0, prompt, regridded))
        # with the same weights, 2509's transformer (no zero_cond_t) modulates the references at t, not 0
        transformer_2509 = build_tiny_qwen_edit_plus(version="2509").transformer
        assert not torch.allclose(base, em.qwen_velocity(transformer_2509, x, 500.0, prompt, reference))


def test_qwen_guided_velocity_at_scale_1_is_the_conditional_one(qwen_plus):
    x, prompt, reference = synthetic_qwen_inputs(18)
    negative = em.QwenPrompt(torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(19)), None)
    cond = em.QwenEditConditioning(prompt, negative, reference)
    with torch.no_grad():
        conditional = em.qwen_velocity(qwen_plus.transformer, x, 700.0, prompt, reference)
        assert torch.equal(em.qwen_guided_velocity(qwen_plus.transformer, x, 700.0, cond, 1.0), conditional)
        assert not torch.allclose(em.qwen_guided_velocity(qwen_plus.transformer, x, 700.0, cond, 4.0), conditional)


def test_qwen_3d_positions_change_the_prompt_encoding(qwen_plus):
    """transformers >= 5.15 needs mm_token_type_ids for Qwen2.5-VL's 3D rope of image tokens, which diffusers
    0.42's edit pipelines do not pass; the option exists so a family can encode as the model was trained."""
    shown = [picture(96, 96, 20)]
    with torch.no_grad():
        sequential = em.qwen_encode_prompt(qwen_plus, PROMPT, shown, plus=True)
        three_d = em.qwen_encode_prompt(qwen_plus, PROMPT, shown, plus=True, with_3d_positions=True)
        pipelines = qwen_plus.encode_prompt(PROMPT, image=shown, device="cpu")[0]
    assert torch.equal(sequential.embeds, pipelines) and sequential.mask is None
    assert sequential.embeds.shape == three_d.embeds.shape and not torch.allclose(sequential.embeds, three_d.embeds)


def test_kontext_velocity_uses_the_reference_and_its_ids(kontext):
    x = initial_latents(64, 64, seed=21)
    with torch.no_grad():
        cond = em.kontext_conditioning(kontext, PROMPT, picture(64, 64, 22), auto_resize=False)
        other = em.kontext_conditioning(kontext, PROMPT, picture(64, 64, 23), auto_resize=False)
        base = em.kontext_velocity(kontext.transformer, x, 600.0, cond, KONTEXT_GUIDANCE)
        assert not torch.allclose(base, em.kontext_velocity(kontext.transformer, x, 600.0, other, KONTEXT_GUIDANCE))
        as_noisy = em.KontextConditioning(cond.tokens, cond.pooled, cond.text_ids, cond.reference,
                                          em.image_position_ids(4, 4, 0, torch.float32))
        assert not torch.allclose(base, em.kontext_velocity(kontext.transformer, x, 600.0, as_noisy, KONTEXT_GUIDANCE))
        assert not torch.allclose(base, em.kontext_velocity(kontext.transformer, x, 600.0, cond, 4.0))


def test_kontext_without_a_reference_is_flux_dev_text_to_image(kontext):
    """Without an image, FluxKontextPipeline runs FluxPipeline's computation (the tiny Kontext has tiny-flux's
    weights), and so does a loop with no reference."""
    flux = FluxPipeline(**{name: module for name, module in kontext.components.items()
                           if name not in ("image_encoder", "feature_extractor")})
    flux.set_progress_bar_config(disable=True)
    x = initial_latents(64, 96, seed=24)
    call = {"prompt": PROMPT, "latents": em.pack(x), "height": 64, "width": 96, "num_inference_steps": STEPS,
            "guidance_scale": KONTEXT_GUIDANCE, "output_type": "latent"}
    theirs = kontext(**call, max_area=64 * 96).images
    torch.testing.assert_close(theirs, flux(**call).images, atol=0, rtol=0)
    torch.testing.assert_close(em.pack(kontext_loop(kontext, x, None, KONTEXT_GUIDANCE)), theirs, atol=0, rtol=0)
