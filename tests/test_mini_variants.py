"""The further families' miniature models: their trainers (reproducible, resumable), their command line, their
package-data budget, and the per-family evaluation that writes their section of MINIATURE.md."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nonrigid.mini.config import VariantConfig
from nonrigid.mini.train import Log
from nonrigid.models.loading import mini_weights_dir
from nonrigid.models.registry import family_of

SMALL = VariantConfig(steps=3, batch=4, dataset_size=16, warmup=1, checkpoint_every=1, threads=1)


def _train(trainer, folder: Path, steps: int) -> Path:
    return trainer(folder, replace(SMALL, steps=steps), progress=False, log=Log(folder / "log.txt", echo=None))


@pytest.mark.parametrize("variant", ["v", "xl", "flow"])
def test_variant_training_is_reproducible_and_resumes_where_it_stopped(tmp_path, variant, model):
    from nonrigid.mini.flow import train_flow
    from nonrigid.mini.variants import train_v
    from nonrigid.mini.xl import train_xl

    trainer = {"v": train_v, "xl": train_xl, "flow": train_flow}[variant]
    straight = _train(trainer, tmp_path / "a", 3)
    _train(trainer, tmp_path / "b", 1)
    resumed = _train(trainer, tmp_path / "b", 3)
    assert "resuming at step 1" in (tmp_path / "b" / "log.txt").read_text()
    files = [p.relative_to(straight) for p in straight.rglob("*.safetensors")]
    assert files, "the trainer saved weights"
    for part in files:
        a, b = load_file(str(straight / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    if variant != "v":  # the VAE and tokenizers are the miniature model's: not stored again
        assert not (straight / "vae").exists() and not (straight / "tokenizer").exists()


def test_variant_flags_reach_the_variant_config():
    from nonrigid.cli.main import build_parser
    from nonrigid.cli.mini import variant_config
    from nonrigid.mini.flow import flow_config
    from nonrigid.mini.xl import xl_config

    parse = build_parser().parse_args
    assert variant_config(parse(["mini", "train", "--variant", "v"])) == VariantConfig()
    assert variant_config(parse(["mini", "train", "--variant", "xl"])) == xl_config()
    assert variant_config(parse(["mini", "train", "--variant", "flow"])) == flow_config()
    config = variant_config(parse(["mini", "train", "--variant", "xl", "--seed", "4", "--unet-steps", "7",
                                   "--threads", "1", "--dataset-size", "99"]))
    assert config == replace(xl_config(), seed=4, steps=7, threads=1, dataset_size=99)


def test_package_data_stays_within_its_budget():
    """All miniature weights within 50 MB; each further family's model within 10 MB (sharing the VAE and
    tokenizer of the miniature model)."""
    root = mini_weights_dir()

    def megabytes(folder: Path) -> float:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6

    assert megabytes(root) <= 50
    for name in ("v", "xl", "flow"):
        if (root / name).exists():
            assert megabytes(root / name) <= 10, name


def test_family_evaluation_compares_ours_with_nti_only_and_writes_its_section(tmp_path, model):
    """`nonrigid mini evaluate --model M --baselines none --docs D` scores ours (every eta) and NTI-only editing on
    each pair and writes M's section into D/MINIATURE.md between markers, keeping what else the page says."""
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import evaluate
    from nonrigid.mini.family_doc import _replace_section
    from nonrigid.mini.judge import load_judge
    from nonrigid.mini.protocol import ETAS

    write_dataset(tmp_path / "data", count=1, edits_per_image=1, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = evaluate(family_of(model), load_judge(), read_dataset(tmp_path / "data"), tmp_path / "run", num_steps=3,
                        opt_steps=1, baselines=(), ablations=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    methods = {(r["setting"], r["eta"]) for r in rows if r["group"] == "methods"}
    assert methods == {("ours", eta) for eta in ETAS} | {("NTI-only", 1.0)}
    assert not any(r["setting"] == "DDIM" for r in rows)  # no ablations in a family run

    doc = tmp_path / "MINIATURE.md"
    doc.write_text("# The miniature world\n\nSD 1.x's page.\n")
    _replace_section(doc, "mini-v", "first")
    _replace_section(doc, "mini-xl", "xl section")
    _replace_section(doc, "mini-v", "second")
    text = doc.read_text()
    assert text.startswith("# The miniature world\n\nSD 1.x's page.")
    assert "second" in text and "first" not in text and "xl section" in text
    assert text.count("## Further model families") == 1


# --------------------------------------------------------------------------------------------------- mini-flow


def test_mini_flow_conditioning_is_what_sd3s_pipeline_encodes(model):
    """The trainer builds token and pooled embeddings itself (batched, with gradients); they must be what
    `StableDiffusion3Pipeline.encode_prompt` gives the model at inference (CLIP states, T5's 256 zero rows)."""
    from nonrigid.mini.flow import build_untrained_pipeline, conditioning

    pipe = build_untrained_pipeline(model)
    prompts = ["a photo of a red dog jumping", ""]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    tokens, pooled = conditioning(pipe, ids)
    for row, prompt in enumerate(prompts):
        want_tokens, _, want_pooled, _ = pipe.encode_prompt(prompt, None, None, device=torch.device("cpu"),
                                                            num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False)
        assert tokens[row : row + 1].shape == want_tokens.shape == (1, 77 + 256, 64)
        # equal up to the rounding of a batch of two against one
        torch.testing.assert_close(tokens[row : row + 1], want_tokens, rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled[row : row + 1], want_pooled, rtol=0, atol=1e-6)


def test_mini_flow_teacher_sees_the_ddpm_latent_of_the_same_signal_to_noise_and_its_velocity_is_exact(model):
    """A flow latent x_s = (1 - s) x0 + s n, rescaled by sqrt(abar) / (1 - s), is the DDPM latent
    sqrt(abar) x0 + sqrt(1 - abar) n of the same noise, at the teacher's (fractional) timestep whose abar it is;
    and a teacher that knows the noise gives back the velocity n - x0 exactly."""
    from nonrigid.mini.flow import teacher_levels, teacher_velocity

    scheduler = model.scheduler
    s = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.93])  # within the teacher's levels (abar from 0.99915 down)
    abar, t, reached = teacher_levels(scheduler, s)
    assert reached.all() and not teacher_levels(scheduler, torch.tensor([0.97]))[2].any()
    table = scheduler.alphas_cumprod.double()
    low, frac = t.floor().long(), (t - t.floor()).double()
    log_at_t = table[low].log() * (1 - frac) + table[(low + 1).clamp(max=999)].log() * frac
    torch.testing.assert_close(log_at_t.float(), abar.log(), rtol=0, atol=1e-4)

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    seen = {}

    class KnowsTheNoise(torch.nn.Module):
        def forward(self, latents, timestep, encoder_hidden_states):
            seen["latents"], seen["timestep"] = latents, timestep
            return type("Out", (), {"sample": noise})()

    velocity = teacher_velocity(KnowsTheNoise(), scheduler, x_s, s, cond=None)
    torch.testing.assert_close(velocity, noise - x0, rtol=0, atol=1e-5)
    ddpm = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen["latents"], ddpm, rtol=0, atol=1e-5)
    assert torch.equal(seen["timestep"], t)


def test_the_flow_family_evaluation_runs_flowedit_and_its_section_shows_it(tmp_path, model):
    """`nonrigid mini evaluate --model mini-flow` runs FlowEdit (its n_max swept) besides ours and NTI-only on the
    same pairs; the section lists every FlowEdit setting, measures reconstruction at the family's guidance (SD3's
    7) with the plain Euler inversion named as such, and its gallery gains FlowEdit's column. The architecture
    is mini-flow's, untrained (the rows' values are not the point here)."""
    from PIL import Image

    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import evaluate, summarize
    from nonrigid.mini.family_doc import _gallery, _section, guidance_for
    from nonrigid.mini.flow import build_untrained_pipeline
    from nonrigid.mini.judge import load_judge
    from nonrigid.mini.protocol import FLOW_BASELINES

    pipe = build_untrained_pipeline(model)
    write_dataset(tmp_path / "data", count=1, edits_per_image=1, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = evaluate(family_of(pipe), load_judge(), read_dataset(tmp_path / "data"), tmp_path / "run", num_steps=3,
                        opt_steps=1, baselines=("flowedit",), ablations=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    n_maxes = FLOW_BASELINES["flowedit"]["n_max"]
    assert sorted(r["eta"] for r in rows if r["setting"] == "flowedit") == sorted(map(float, n_maxes))
    assert guidance_for(family_of(pipe)) == 7.0
    recon = {"ddim_g1": 0.01, "ddim_g7": 0.5, "nti_g7": 0.02}
    section = _section(family_of(pipe), "mini-flow", summarize(rows), 1, recon, "fidelity", "g.png",
                       "nonrigid mini ...")
    assert "Plain (Euler) inversion round trip at guidance 1: 0.010" in section and "NTI at 7: 0.020" in section
    for n_max in n_maxes:
        assert f"| FlowEdit, n_max {n_max} |" in section
    assert "At the identity error of FlowEdit at n_max 33 (the reference's) (rounded" in section
    _gallery(tmp_path / "run", [0], tmp_path / "g.png", flowedit=True)
    strip = Image.open(tmp_path / "run" / "results" / "000.png")
    assert Image.open(tmp_path / "g.png").width == 2 * (strip.width + 64)
