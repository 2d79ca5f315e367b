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

SMALL = VariantConfig(steps=3, batch=4, dataset_size=16, warmup=1, checkpoint_every=1, threads=1)


def _train(trainer, folder: Path, steps: int) -> Path:
    return trainer(folder, replace(SMALL, steps=steps), progress=False, log=Log(folder / "log.txt", echo=None))


@pytest.mark.parametrize("variant", ["v", "xl"])
def test_variant_training_is_reproducible_and_resumes_where_it_stopped(tmp_path, variant, model):
    from nonrigid.mini.variants import train_v
    from nonrigid.mini.xl import train_xl

    trainer = train_v if variant == "v" else train_xl
    straight = _train(trainer, tmp_path / "a", 3)
    _train(trainer, tmp_path / "b", 1)
    resumed = _train(trainer, tmp_path / "b", 3)
    assert "resuming at step 1" in (tmp_path / "b" / "log.txt").read_text()
    files = [p.relative_to(straight) for p in straight.rglob("*.safetensors")]
    assert files, "the trainer saved weights"
    for part in files:
        a, b = load_file(str(straight / part)), load_file(str(resumed / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    if variant == "xl":  # the VAE and tokenizers are the miniature model's: not stored again
        assert not (straight / "vae").exists() and not (straight / "tokenizer").exists()


def test_variant_flags_reach_the_variant_config():
    from nonrigid.cli.main import build_parser
    from nonrigid.cli.mini import variant_config
    from nonrigid.mini.xl import xl_config

    parse = build_parser().parse_args
    assert variant_config(parse(["mini", "train", "--variant", "v"])) == VariantConfig()
    assert variant_config(parse(["mini", "train", "--variant", "xl"])) == xl_config()
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
    for name in ("v", "xl"):
        if (root / name).exists():
            assert megabytes(root / name) <= 10, name


def test_family_evaluation_compares_ours_with_nti_only_and_writes_its_section(tmp_path, model):
    """`nonrigid mini evaluate --model M --baselines none --docs D` scores ours (every eta) and NTI-only editing on
    each pair and writes M's section into D/MINIATURE.md between markers, keeping what else the page says."""
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import ETAS, evaluate
    from nonrigid.mini.family_doc import _replace_section
    from nonrigid.mini.judge import load_judge

    write_dataset(tmp_path / "data", count=1, edits_per_image=1, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = evaluate(model, load_judge(), read_dataset(tmp_path / "data"), tmp_path / "run", num_steps=3,
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
