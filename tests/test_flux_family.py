"""FLUX (rectified flow, packed latents, distilled guidance, dynamic shift) through the model seam, with diffusers
as the oracle.

On tiny random-weight FLUX pipelines (``tiny-flux``: FLUX.1-dev's layout with the guidance embedding;
``tiny-flux-schnell``: without): the paper's sampling with the edit switched off, from a given x_T, equals
``FluxPipeline`` called with the packed x_T; generation equals the pipeline from the same noise; our flow inversion
equals a loop written against diffusers alone (its scheduler set with FLUX's dynamic shift, its prompt encoding, its
transformer on packed latents).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from nonrigid import edit, sample
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.inversion import invert_latents
from nonrigid.stages.sampling import generate

PROMPT = "a photo of a jumping dog"
STEPS = 4
SIDE = 64


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-flux", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def picture(dog_image):
    return dog_image.resize((SIDE, SIDE))


def pack(x: torch.Tensor) -> torch.Tensor:
    return FluxPipeline._pack_latents(x, x.shape[0], x.shape[1], x.shape[2], x.shape[3])


def test_flux_is_detected_with_its_conditioning_and_no_unconditional_branch(pipe):
    family = family_of(pipe)
    assert family.name == "flux" and "distilled guidance" in family.describe()
    assert family.defaults.size == SIDE and family.defaults.guidance_scale == 3.5
    assert family.unconditional() is None
    cond = family.encode_prompt(PROMPT)
    tokens, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, device="cpu")
    torch.testing.assert_close(cond.tokens, tokens, atol=0, rtol=0)
    torch.testing.assert_close(cond.tensors["pooled"], pooled, atol=0, rtol=0)
    assert cond.tokens.shape == (1, 512, 32)
    schnell = family_of(load_pipeline("tiny-flux-schnell", device="cpu", dtype="fp32"))
    assert "no guidance" in schnell.describe()


def test_the_schedule_is_shifted_for_the_latent_at_hand(pipe):
    family = family_of(pipe)
    for side in (64, 128):
        noise = family.initial_noise(side, torch.Generator().manual_seed(0))
        seq = (side // 16) ** 2
        reference = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        reference.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=calculate_shift(seq))
        torch.testing.assert_close(family.sampling_scheduler(STEPS, noise).timesteps, reference.timesteps.float())
    native = family.sampling_scheduler(STEPS).timesteps  # no latents: the native size (64 px for the tiny model)
    torch.testing.assert_close(native, family.sampling_scheduler(STEPS, family.initial_noise(64, None)).timesteps)
    assert not torch.equal(family.diffusers_scheduler(STEPS, 16).timesteps,
                           family.diffusers_scheduler(STEPS, 4096).timesteps)


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_sampling_with_the_edit_off_equals_the_diffusers_pipeline(pipe, picture, guidance):
    result = edit(pipe, picture, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=guidance, num_steps=STEPS)
    x_t = result.stages.inversion.latent
    ours = sample(pipe, result.stages.inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    theirs = pipe(prompt=PROMPT, latents=pack(x_t.clone()), num_inference_steps=STEPS, guidance_scale=guidance,
                  height=SIDE, width=SIDE, output_type="latent").images
    torch.testing.assert_close(pack(ours), theirs, atol=1e-5, rtol=0)
    assert not torch.equal(ours, x_t)


def test_generating_equals_the_diffusers_pipeline_from_the_same_noise(pipe):
    ours = generate(family_of(pipe), PROMPT, seed=5, num_steps=STEPS, guidance_scale=3.5)
    noise = family_of(pipe).initial_noise(SIDE, torch.Generator().manual_seed(5))
    theirs = pipe(prompt=PROMPT, latents=pack(noise), num_inference_steps=STEPS, guidance_scale=3.5, height=SIDE,
                  width=SIDE).images[0]
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def oracle_inversion(pipe, x0: torch.Tensor, prompt: str, steps: int, guidance: float) -> torch.Tensor:
    """Flow inversion written against diffusers alone, on packed latents: the scheduler set as ``FluxPipeline``
    sets it (sigmas linspace(1, 1/N, N), mu from the packed length), its prompt encoding and ids, its transformer
    with the distilled guidance; sampling's steps undone last first, querying t_i at the current latent."""
    h, w = x0.shape[-2:]
    x = pack(x0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(x.shape[1]))
    tokens, pooled, text_ids = pipe.encode_prompt(prompt, prompt, device="cpu")
    image_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    path = [x]
    with torch.no_grad():
        for i in reversed(range(steps)):
            t = scheduler.timesteps[i]
            v = pipe.transformer(hidden_states=x, timestep=t.expand(1) / 1000, guidance=torch.full([1], guidance),
                                 pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=text_ids,
                                 img_ids=image_ids, return_dict=False)[0]
            x = x + (scheduler.sigmas[i] - scheduler.sigmas[i + 1]) * v
            path.append(x)
    return torch.cat(path)


def test_flow_inversion_equals_a_loop_over_diffusers_sigmas(pipe, picture):
    family = family_of(pipe)
    x0 = family.encode_image(picture)
    ours = invert_latents(family, x0, family.encode_prompt(PROMPT), STEPS)[0]  # guidance 1: the distilled value 1
    theirs = oracle_inversion(pipe, x0, PROMPT, STEPS, 1.0)
    assert ours.shape == (STEPS + 1, 16, 8, 8)
    torch.testing.assert_close(pack(ours), theirs, atol=1e-5, rtol=0)


def test_a_saved_flux_folder_loads_as_the_flux_family(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"), device="cpu", dtype="fp32")
    family = family_of(loaded)
    assert family.name == "flux" and family.defaults.size == 1024  # FluxPipeline's own default size
    cond = family.encode_prompt(PROMPT)
    torch.testing.assert_close(cond.tokens, family_of(pipe).encode_prompt(PROMPT).tokens, atol=0, rtol=0)


class ParkedEncoder(torch.nn.Module):
    """A text encoder that reports itself parked on ``home`` (what ``--low-memory`` does on a GPU machine: the
    CPU, while the transformer is on the GPU) and records where it is moved; it refuses to encode anywhere but on
    ``works_on``. On a CPU-only machine this stands in for the second device."""

    def __init__(self, inner: torch.nn.Module, home: torch.device, works_on: torch.device):
        super().__init__()
        self.inner, self.at, self.works_on, self.moves = inner, home, works_on, []

    @property
    def device(self) -> torch.device:
        return self.at

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def to(self, device):  # type: ignore[override]
        self.moves.append(torch.device(device))
        self.at = torch.device(device)
        return self

    def forward(self, *args, **kwargs):
        assert self.at == self.works_on, f"encoded on {self.at}, not on the transformer's {self.works_on}"
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_parked_text_encoders_come_to_the_transformer_for_each_encoding_and_go_back(model):
    pipe = load_pipeline(model, device="cpu", dtype="fp32")  # its own: the encoders are swapped below
    family = family_of(pipe)
    assert family.parks_text_encoders
    want = family.encode_prompt(PROMPT)
    elsewhere = torch.device("meta")  # "not the transformer's device"
    parked = [ParkedEncoder(pipe.text_encoder, elsewhere, family.device),
              ParkedEncoder(pipe.text_encoder_2, elsewhere, family.device)]
    pipe.text_encoder, pipe.text_encoder_2 = parked
    for _ in range(2):  # every encoding brings them over and parks them again
        got = family.encode_prompt(PROMPT)
        for name in want.tensors:
            torch.testing.assert_close(got.tensors[name], want.tensors[name], atol=0, rtol=0)
            assert got.tensors[name].device == family.device
    for encoder in parked:
        assert encoder.at == elsewhere and encoder.moves == [family.device, elsewhere] * 2
