"""The miniature world: renderer, ground-truth metrics, dataset layout, training's reproducibility and resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from nonrigid.mini.dataset import read_dataset, write_dataset
from nonrigid.mini.judge import identity_errors
from nonrigid.mini.world import POSES, random_scene, render, render_with_mask, vocabulary
from nonrigid.models.tiny import build_clip_tokenizer


def test_rendering_is_deterministic_and_pose_changes_only_the_subject():
    scene = random_scene(random.Random(7))
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    from nonrigid.mini.judge import _dilate

    base, base_mask = render_with_mask(scene)
    for pose in POSES:
        other, other_mask = render_with_mask(scene.with_pose(pose))
        background = ~_dilate((base_mask > 0) | (other_mask > 0), 3)  # Lanczos downsampling reaches 3 px
        assert background.mean() > 0.7
        assert np.array_equal(np.asarray(base)[background], np.asarray(other)[background])
        if pose != scene.pose:
            assert np.abs(base_mask - other_mask).sum() > 20, "each pose must look different"


def test_every_caption_word_is_one_token_of_the_world_tokenizer():
    tokenizer = build_clip_tokenizer(vocabulary())
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    scene = random_scene(random.Random(1))
    assert len(tokenizer(scene.caption).input_ids) == len(scene.caption.split()) + 2


def test_identity_errors_are_zero_for_the_ideal_edit_and_grow_with_damage():
    scene = random_scene(random.Random(3), pose="standing")
    ideal = render(scene.with_pose("jumping"))
    exact = identity_errors(scene, "jumping", ideal)
    assert exact["background_error"] == 0 and exact["ideal_error"] == 0
    assert exact["subject_error"] < 0.05  # anti-aliased edges blend the subject with the background
    unchanged = identity_errors(scene, "jumping", render(scene))
    assert unchanged["background_error"] == 0, "the input itself keeps the background"
    noisy = np.asarray(ideal, dtype=np.float32) + np.random.default_rng(0).normal(0, 30, (64, 64, 3))
    damaged = identity_errors(scene, "jumping", Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    assert damaged["background_error"] > 0.05 and damaged["identity_error"] > exact["identity_error"]
    from nonrigid.mini.world import render_background

    vanished = identity_errors(scene, "jumping", render_background(scene))
    assert vanished["subject_error"] > 0.1, "a subject that disappeared lost its identity"
    moved = identity_errors(scene, "lying", render(scene))
    assert moved["subject_error"] < 0.05, "keeping the pose is a failed edit, not an identity loss (edges blend)"
    recoloured = scene.__class__(**{**scene.to_dict(), "colour": "blue" if scene.colour != "blue" else "red"})
    other = identity_errors(scene, "jumping", render(recoloured.with_pose("jumping")))
    assert other["subject_error"] > 0.1 and other["background_error"] == 0


def test_dataset_has_tedbench_layout_and_consistent_ground_truth(tmp_path):
    write_dataset(tmp_path, count=5, edits_per_image=2, seed=3)
    pairs = json.loads((tmp_path / "input_list.json").read_text())
    assert len(pairs) == 10 and set(pairs[0]) == {"img_name", "target_text", "source_text"}
    for pair in read_dataset(tmp_path):
        assert pair.image.is_file() and Image.open(pair.image).size == (64, 64)
        assert pair.target_pose != pair.scene.pose
        assert pair.target_text.rstrip(".") == pair.scene.with_pose(pair.target_pose).caption
        assert np.array_equal(np.asarray(Image.open(pair.image).convert("RGB")), np.asarray(render(pair.scene)))
    write_dataset(tmp_path / "again", count=5, edits_per_image=2, seed=3)
    assert (tmp_path / "again" / "input_list.json").read_text() == (tmp_path / "input_list.json").read_text()


def test_judge_recognises_pose_kind_and_colour_of_rendered_scenes():
    from nonrigid.mini.fidelity import render_accuracy
    from nonrigid.mini.judge import load_judge, pose_probabilities
    from nonrigid.models.loading import mini_weights_dir as weights_dir

    if not (weights_dir() / "judge.safetensors").exists():
        pytest.skip("judge weights not trained yet (nonrigid mini judge)")
    judge = load_judge()
    ceiling = render_accuracy(judge, per_pose=16, seed=12345)
    assert min(ceiling.accuracy.values()) > 0.9, ceiling.line()
    rng = random.Random(12345)
    scenes = [random_scene(rng) for _ in range(16)]
    probs = pose_probabilities(judge, [render(s) for s in scenes])
    assert torch.allclose(probs.sum(-1), torch.ones(16)), "pose probabilities are a distribution of their own"


def test_min_snr_weights_cap_only_the_nearly_clean_timesteps():
    from nonrigid.mini.model import build_untrained_pipeline
    from nonrigid.mini.train import timestep_weights

    scheduler = build_untrained_pipeline().scheduler
    t = torch.arange(0, 1000)
    assert torch.equal(timestep_weights(scheduler, t, 0.0), torch.ones(1000))
    weights = timestep_weights(scheduler, t, 5.0)
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    assert torch.all(weights[snr <= 5] == 1), "noisy timesteps keep the plain loss"
    assert torch.allclose(weights[snr > 5], 5 / snr[snr > 5]), "clean ones are scaled down to gamma / SNR"
    assert torch.all(weights[1:] >= weights[:-1]), "the weight never falls as noise grows"


def test_training_is_reproducible_and_resumes_where_it_stopped(tmp_path):
    from nonrigid.mini.config import TrainConfig
    from nonrigid.mini.train import Log, train

    small = dict(vae_steps=2, vae_batch=4, dataset_size=16, unet_batch=4, warmup=1, checkpoint_every=1, threads=1)
    quiet = dict(progress=False)
    straight = train(tmp_path / "a", TrainConfig(unet_steps=3, **small),
                     log=Log(tmp_path / "a.log", echo=None), **quiet)
    train(tmp_path / "b", TrainConfig(unet_steps=1, **small), log=Log(tmp_path / "b.log", echo=None), **quiet)
    resumed = train(tmp_path / "b", TrainConfig(unet_steps=3, **small), log=Log(tmp_path / "b.log", echo=None),
                    **quiet)
    assert "unet: resuming at step 1" in (tmp_path / "b.log").read_text()
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(straight / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_mini_train_flags_reach_the_training_config():
    """Every recipe knob the CLI offers lands in TrainConfig; without flags the CLI trains the default recipe."""
    from nonrigid.cli.main import build_parser
    from nonrigid.cli.mini import mini_train_config
    from nonrigid.mini.config import TrainConfig

    parse = build_parser().parse_args
    assert mini_train_config(parse(["mini", "train"])) == TrainConfig()
    config = mini_train_config(parse(["mini", "train", "--seed", "3", "--vae-steps", "7", "--unet-steps", "9",
                                      "--unet-batch", "64", "--snr-gamma", "0", "--dataset-size", "11",
                                      "--threads", "1"]))
    assert config == TrainConfig(seed=3, vae_steps=7, unet_steps=9, unet_batch=64, snr_gamma=0.0,
                                 dataset_size=11, threads=1)


def test_nonrigid_bench_runs_unchanged_on_a_world_dataset(tmp_path):
    """The world's dataset is a TEdBench to `nonrigid bench`: each pair is edited with the miniature model, and a
    setting that uses source prompts takes them from the ground truth (the scene's caption)."""
    from nonrigid.cli import main
    from nonrigid.evaluation.runfolder import read_rows

    write_dataset(tmp_path / "data", count=2, edits_per_image=1, seed=5)
    pairs = read_dataset(tmp_path / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["bench", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--method", "ours",
                     "--sweep", "source=none,pair", "--set", "num_steps=3", "--set", "opt_steps=2",
                     "--set", "inner_steps=1", "--set", "eta=0", "--model", "mini", "--size", "64",
                     "--metrics", "tiny", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = read_rows(tmp_path / "run")
    assert sorted((r["pair"], r["source_prompt"].rstrip(".")) for r in rows) == sorted(
        (i, caption) for i, pair in enumerate(pairs) for caption in ("", pair.scene.caption))
    for row in rows:
        assert row["target_text"] == pairs[row["pair"]].target_text
        assert Image.open(tmp_path / "run" / row["image"]).size == (64, 64)


def test_ablation_findings_are_read_from_the_numbers():
    """The report's ablation sentences name the NTI variant that measured the lower identity error and the ends
    of the injection sweep, averaged over eta, whichever way they point."""
    from nonrigid.mini.doc import ablation_findings

    def stats(identity: float, success: float) -> dict[str, float]:
        return {"identity_error": identity, "edit_success": success}

    summary = {("inversion", "NTI-src", 0.0): stats(0.10, 0.9), ("inversion", "NTI-src", 1.0): stats(0.12, 0.9),
               ("inversion", "NTI-w/o-src", 0.0): stats(0.05, 0.5), ("inversion", "NTI-w/o-src", 1.0): stats(0.07, 0.7),
               ("injection", "inject 10%", 0.0): stats(0.2, 0.8), ("injection", "inject 0%", 0.0): stats(0.3, 0.9),
               ("injection", "inject 50%", 0.0): stats(0.1, 0.4)}
    inversion, injection = ablation_findings(summary)
    assert "NTI-src 0.110 / 0.900; NTI-w/o-src 0.060 / 0.600" in inversion
    assert "NTI-w/o-src keeps identity best here, at a lower edit success" in inversion
    assert "0% 0.300 / 0.900; 10% 0.200 / 0.800; 50% 0.100 / 0.400" in injection
    assert "From 0% to 50%, identity error goes 0.300 -> 0.100 and edit success 0.900 -> 0.400" in injection
