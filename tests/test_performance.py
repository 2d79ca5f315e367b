"""Speed and memory: every saving equals the unshared computation, the benchmark's UNet counter counts exactly,
negative-prompt inversion, and ``configure_model`` (low memory, channels-last, compile) keeps results.

"Unshared" is the benchmark's straightforward procedure (``benchmarks/straightforward.py``): each variant its own
run of all N steps from x_T, both guidance branches at every step, nothing read from the inversion.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from nonrigid import edit, invert, optimize_text_batch, sample
from nonrigid.methods.base import resolve_params
from nonrigid.methods.catalogue import OURS
from nonrigid.methods.ours import guidance_of
from nonrigid.models.fingerprint import model_fingerprint
from nonrigid.models.loading import configure_model, load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import straightforward
from measure import UNetCounter

N = 6
PROMPT = "a photo of a jumping dog"
ATOL = 2e-3  # batch-1 vs batched convolutions differ in the last bits; guidance 7.5 amplifies that a little
NEVER = -1.0  # an early-stop threshold no loss goes below: NTI's inner loop always runs to the end


@pytest.fixture(scope="module")
def texts(tiny_pipe, dog_image):
    return optimize_text_batch(tiny_pipe, dog_image, PROMPT, steps=3, seeds=[0, 1])


@pytest.fixture(scope="module")
def nti(tiny_pipe, dog_image):
    return invert(tiny_pipe, dog_image, method="nti", num_steps=N, inner_steps=2, early_stop=NEVER)


@pytest.fixture(scope="module")
def npi(tiny_pipe, dog_image):
    return invert(tiny_pipe, dog_image, "a dog", method="npi", num_steps=N)


def unshared(pipe, inversion, texts, etas, inject_steps) -> list[torch.Tensor]:
    """Every variant as a separate straightforward run, in the project's grid order."""
    return [straightforward.sample_variant_latent(pipe, inversion, text, eta, k)[0]
            for text in texts for k in inject_steps for eta in etas]


# --------------------------------------------------------------------------------------------------- the counter


def test_unet_counter_counts_rows_and_backward_passes_exactly(tiny_pipe, dog_image, texts):
    hooks_before = (len(tiny_pipe.unet._forward_pre_hooks), len(tiny_pipe.unet._forward_hooks))
    with UNetCounter(tiny_pipe.unet) as counter:
        invert(tiny_pipe, dog_image, method="nti", num_steps=5, inner_steps=2, early_stop=NEVER)
        nti_work = counter.snapshot()
        optimize_text_batch(tiny_pipe, dog_image, PROMPT, steps=3, seeds=[0, 1])
        text_work = counter.snapshot() - nti_work
    # NTI: 5 DDIM-inversion forwards, then per step 2 forward+backward calls (the first with the step's conditional
    # row, which is back-propagated through too: a call's rows share its backward pass) and one forward
    assert (nti_work.calls, nti_work.forward_rows, nti_work.backward_rows) == (20, 25, 15)
    assert nti_work.units == 5 + 5 * (2 * 2 + 2 + 1)
    # text optimization: one call per step, one row per seed, each back-propagated
    assert (text_work.calls, text_work.forward_rows, text_work.backward_rows, text_work.units) == (3, 6, 6, 12)
    assert text_work.forward_seconds > 0 and text_work.backward_seconds > 0
    assert (len(tiny_pipe.unet._forward_pre_hooks), len(tiny_pipe.unet._forward_hooks)) == hooks_before


# --------------------------------------------------------------------------------------------------- savings


def test_guidance_one_evaluates_one_branch_and_equals_the_two_branch_computation(tiny_pipe, dog_image, texts):
    unet = tiny_pipe.unet
    ddim = invert(tiny_pipe, dog_image, method="ddim", num_steps=N)
    assert ddim.guidance_scale == 1.0
    t = family_of(tiny_pipe).sampling_scheduler(N).timesteps[2]
    x = ddim.trajectory[3:4]
    cond, uncond = texts[0].optimized_embedding, ddim.unconditional_embedding
    with torch.no_grad(), UNetCounter(unet) as counter:
        one = family_of(tiny_pipe).predict(x, t, cond, uncond, 1.0)
        assert counter.tally.forward_rows == 1
        both = straightforward.guided_noise_both_branches(unet, x, t, cond, uncond, 1.0)
    torch.testing.assert_close(one, both, atol=1e-5, rtol=0)

    etas, steps = (0.0, 0.5), (0, 2)
    with UNetCounter(unet) as counter:
        ours = sample(tiny_pipe, ddim, texts, etas, steps, output_type="latent")
    # 2 source steps once at batch 1, then one row per active variant: 4 variants from step 0, 4 from step 2
    assert counter.tally.units == 2 + 4 * N + 4 * (N - 2)
    with UNetCounter(unet) as counter:
        reference = unshared(tiny_pipe, ddim, texts, etas, steps)
    assert counter.tally.units == len(reference) * N * 2
    for row, latent in enumerate(reference):
        torch.testing.assert_close(ours[row], latent, atol=ATOL, rtol=0)


@pytest.mark.parametrize("which", ["nti", "npi"])
def test_variants_start_from_the_stored_reconstruction_and_equal_separate_full_runs(tiny_pipe, texts, nti, npi,
                                                                                   which):
    inversion = {"nti": nti, "npi": npi}[which]
    etas, steps = (0.0, 0.4), (0, 3, N)
    with UNetCounter(tiny_pipe.unet) as counter:
        shared = sample(tiny_pipe, inversion, texts, etas, steps, output_type="latent")
    # no source step is recomputed: each variant runs only its N - K steps, two branches each
    assert counter.tally.units == sum(2 * (N - k) * len(etas) * len(texts) for k in steps)
    for row, latent in enumerate(unshared(tiny_pipe, inversion, texts, etas, steps)):
        torch.testing.assert_close(shared[row], latent, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["nti", "npi"])
def test_another_eta_from_cached_stages_costs_at_most_n_minus_k_over_n_of_a_full_run(tiny_pipe, dog_image,
                                                                                     tmp_path, method):
    cache = StageCache(tmp_path)
    settings = {"num_steps": N, "opt_steps": 2, "inner_steps": 1, "inject": (0.5,), "inversion": method}
    first = edit(tiny_pipe, dog_image, PROMPT, size=64, cache=cache, etas=(0.0,), **settings)
    k = first.variants[0].knobs["K"]
    with UNetCounter(tiny_pipe.unet) as counter:
        again = edit(tiny_pipe, dog_image, PROMPT, size=64, cache=cache, etas=(0.7,), **settings)
    assert again.cache == {"text_optimization": [0], "inversion": True}
    with UNetCounter(tiny_pipe.unet) as full_run:
        straightforward.sample_variant_latent(tiny_pipe, again.stages.inversion, again.stages.text_optimizations[0],
                                              0.7, 0)
    assert full_run.tally.units == 2 * N
    assert counter.tally.units == 2 * (N - k) <= (N - k) / N * full_run.tally.units


def test_batched_seed_text_optimization_equals_separate_runs_with_the_same_unet_work(tiny_pipe, dog_image, texts):
    with UNetCounter(tiny_pipe.unet) as counter:
        separate = straightforward.text_optimizations(tiny_pipe, dog_image, PROMPT, 3, 1e-3, [0, 1])
    assert (counter.tally.calls, counter.tally.units) == (6, 12)
    for batched, alone in zip(texts, separate, strict=True):
        torch.testing.assert_close(batched.optimized_embedding, alone.optimized_embedding, atol=1e-5, rtol=0)


def test_straightforward_null_text_inversion_equals_ours_with_one_forward_more_per_step(tiny_pipe, dog_image, nti):
    with UNetCounter(tiny_pipe.unet) as counter:
        reference = straightforward.null_text_inversion(tiny_pipe, dog_image, "", N, None, 2, NEVER)
    assert counter.tally.units == N + N * (1 + 2 * 2 + 2)
    torch.testing.assert_close(reference.trajectory, nti.trajectory)
    torch.testing.assert_close(reference.null_embeddings, nti.null_embeddings, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------- NPI


def test_npi_walks_the_ddim_path_and_uses_the_source_embedding_as_negative_prompt(tiny_pipe, dog_image, npi):
    ddim = invert(tiny_pipe, dog_image, "a dog", method="ddim", num_steps=N)
    assert torch.equal(npi.trajectory, ddim.trajectory)
    assert npi.guidance_scale == 7.5 and npi.null_embeddings is None and npi.losses is None
    assert torch.equal(npi.unconditional_embedding, npi.source_embedding)
    assert not torch.equal(npi.source_embedding, ddim.unconditional_embedding)  # tau("a dog") != tau("")
    assert all(torch.equal(npi.uncond_at(i).tokens, npi.source_embedding) for i in range(N))
    assert npi.reconstruction.shape == (N + 1, *npi.latent.shape[1:])
    assert torch.equal(npi.reconstruction[0:1], npi.latent)


def test_npi_reconstruction_is_the_guided_source_path_and_equals_ddim_sampling_at_guidance_one(tiny_pipe, dog_image,
                                                                                               npi, texts):
    recomputed = sample(tiny_pipe, npi, texts[0], (0.0,), (N,), output_type="latent", use_reconstruction=False)
    torch.testing.assert_close(recomputed[0], npi.reconstruction[-1], atol=ATOL, rtol=0)  # two branches at 7.5
    # u = c makes the guided prediction the conditional one: the DDIM inversion sampled back at guidance 1
    ddim = invert(tiny_pipe, dog_image, "a dog", method="ddim", num_steps=N)
    back = sample(tiny_pipe, ddim, texts[0], (0.0,), (N,), output_type="latent")
    torch.testing.assert_close(back[0], npi.reconstruction[-1], atol=1e-5, rtol=0)


def test_npi_with_empty_source_reconstructs_exactly_like_ddim_sampled_at_its_guidance(tiny_pipe, dog_image, texts):
    npi_empty = invert(tiny_pipe, dog_image, "", method="npi", num_steps=N)
    ddim_75 = invert(tiny_pipe, dog_image, "", method="ddim", num_steps=N, guidance_scale=7.5)
    # with an empty source tau("") is both the condition and DDIM's negative prompt: the same guided path
    for k in (N, 2):
        ours = sample(tiny_pipe, npi_empty, texts[0], (0.0, 0.5), (k,), output_type="latent")
        theirs = sample(tiny_pipe, ddim_75, texts[0], (0.0, 0.5), (k,), output_type="latent")
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_npi_is_an_inversion_choice_everywhere(tiny_pipe, dog_image):
    assert guidance_of(resolve_params(OURS, {"inversion": "npi"})) == 7.5
    assert resolve_params(OURS, {"inversion": "npi"})["inversion"] == "npi"
    with UNetCounter(tiny_pipe.unet) as counter:
        invert(tiny_pipe, dog_image, "a dog", method="npi", num_steps=N, inner_steps=10)
    assert (counter.tally.units, counter.tally.backward_rows) == (2 * N, 0)  # no optimisation, one branch


# --------------------------------------------------------------------------------------------------- configure


def small_edit(pipe, image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """All three stages, small: the embedding, the null embeddings, the final latents and the decoded pixels."""
    text = optimize_text_batch(pipe, image, PROMPT, steps=2, seeds=[0])[0]
    inversion = invert(pipe, image, method="nti", num_steps=3, inner_steps=2, early_stop=NEVER)
    latents = sample(pipe, inversion, text, (0.0, 0.5), (1,), output_type="latent")
    pixels = np.stack([np.asarray(im, dtype=np.int16) for im in sample(pipe, inversion, text, (0.0, 0.5), (1,))])
    return text.optimized_embedding, inversion.null_embeddings, latents, pixels


def saved_activation_bytes(pipe, image) -> int:
    """Bytes autograd keeps for the backward pass of one text-optimization forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        optimize_text_batch(pipe, image, PROMPT, steps=1, seeds=[0])
    return sum(saved)


def test_low_memory_mode_keeps_every_result_and_stores_fewer_activations(dog_image):
    pipe = load_pipeline("tiny", device="cpu", dtype="fp32")  # a pipeline of its own: tiny_pipe must not change
    default = small_edit(pipe, dog_image)
    default_bytes = saved_activation_bytes(pipe, dog_image)
    configure_model(family_of(pipe), low_memory=True)
    assert pipe.vae.use_slicing and pipe.vae.use_tiling and pipe.unet.is_gradient_checkpointing
    low = small_edit(pipe, dog_image)
    assert saved_activation_bytes(pipe, dog_image) < 0.8 * default_bytes
    for a, b in zip(default[:3], low[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert np.abs(default[3] - low[3]).max() <= 1
    assert all(not p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    configure_model(family_of(pipe), low_memory=False)
    assert not (pipe.vae.use_slicing or pipe.vae.use_tiling or pipe.unet.is_gradient_checkpointing)


def test_channels_last_keeps_results_and_cache_keys(dog_image, texts, nti):
    pipe = load_pipeline("tiny", device="cpu", dtype="fp32")
    fingerprint = model_fingerprint(pipe)
    before = sample(pipe, nti, texts, (0.0, 0.5), (2,), output_type="latent")
    configure_model(family_of(pipe), channels_last=True)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert model_fingerprint(pipe) == fingerprint
    after = sample(pipe, nti, texts, (0.0, 0.5), (2,), output_type="latent")
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
    configure_model(family_of(pipe))  # the CPU default: back to the contiguous layout
    assert pipe.unet.conv_in.weight.is_contiguous()


def test_attention_runs_pytorch_sdpa(tiny_pipe):
    processors = [*tiny_pipe.unet.attn_processors.values(), *tiny_pipe.vae.attn_processors.values()]
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)


@pytest.mark.skipif(os.environ.get("NONRIGID_TEST_COMPILE") != "1",
                    reason="torch.compile builds C++ kernels: about 1.5 min on 2 shared cores "
                    "(set NONRIGID_TEST_COMPILE=1 to run it)")
def test_compiled_unet_gives_the_same_edit(dog_image, texts, nti):
    pipe = load_pipeline("tiny", device="cpu", dtype="fp32")
    before = sample(pipe, nti, texts[0], (0.0, 0.5), (2,), output_type="latent")
    configure_model(family_of(pipe), compile=True)
    after = sample(pipe, nti, texts[0], (0.0, 0.5), (2,), output_type="latent")
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------- benchmark


def quick_benchmark(tmp_path, config: str, *flags: str, doc: str = "") -> tuple[dict, dict, tuple[int, int, int]]:
    """``bench_edit --config CONFIG --quick`` into ``tmp_path`` (torch's thread count restored after): the run as
    saved, its sections, and the plan's steps N, injection steps K and number of variants."""
    import bench_edit

    threads = torch.get_num_threads()
    try:
        bench_edit.main(["--config", config, *flags, "--quick", "--results", str(tmp_path), "--doc", doc])
    finally:
        torch.set_num_threads(threads)
    run = json.loads((tmp_path / f"{config}.json").read_text())
    plan = run["plan"]
    return run, run["sections"], (plan["num_steps"], round(plan["inject"] * plan["num_steps"]), len(plan["etas"]))


def test_benchmark_measures_the_work_it_should_and_keeps_the_prose_of_its_document(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nhand-written intro\n\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\n"
                   "\nhand-written analysis\n")
    run, s, (n, k, variants) = quick_benchmark(tmp_path, "cpu", "--layout", "tiny", "--size", "64", "--no-mini",
                                               doc=str(doc))
    assert s["straightforward.C"]["unet_units"] == variants * 2 * n
    assert s["ours.C"]["unet_units"] == s["ours.sweep_cached"]["unet_units"] == variants * 2 * (n - k)
    assert s["ours.extra_variant"]["unet_units"] == 2 * (n - k)
    assert s["ours.A"]["unet_units"] == s["straightforward.A"]["unet_units"] == 2 * run["plan"]["opt_steps"]
    # B alone: the same UNet rows, fewer calls (the conditional prediction rides along the first unconditional one)
    assert s["ours.B"]["unet_units"] == s["straightforward.B"]["unet_units"]
    assert s["ours.B"]["unet_calls"] < s["straightforward.B"]["unet_calls"]
    # A and B as an edit runs them: A's rows in B's calls, so the sequential chain is B's alone. The backward pass
    # of a shared call runs over the whole batch, B's rows (at most two a call) included: that is the price.
    alone = s["ours.A"]["unet_units"] + s["ours.B"]["unet_units"]
    assert alone < s["ours.AB"]["unet_units"] <= alone + 2 * run["plan"]["opt_steps"]
    assert s["ours.AB"]["unet_calls"] == s["ours.B"]["unet_calls"]
    assert s["ours.edit"]["unet_calls"] == (s["ours.keys"]["unet_calls"] + s["ours.AB"]["unet_calls"]
                                            + s["ours.C"]["unet_calls"])
    assert s["ours.B_npi"]["unet_units"] == 2 * n
    assert run["checks"]["final_latent_relative_diff"] < 1e-3
    text = doc.read_text()
    assert "hand-written intro" in text and "hand-written analysis" in text and "\nold\n" not in text
    assert text.index("hand-written intro") < text.index("| ours | C sampling") < text.index("hand-written analysis")


def test_the_sd3_benchmark_counts_transformer_work_on_the_tiny_sd3_model(tmp_path):
    import bench_edit

    run, s, (n, k, variants) = quick_benchmark(tmp_path, "sd3-cpu")
    assert "SD3 layout" in run["environment"]["family"] and run["environment"]["guidance_scale"] == 7.0
    assert s["ours.C"]["unet_units"] == s["ours.sweep_cached"]["unet_units"] == variants * 2 * (n - k)
    assert s["ours.extra_variant"]["unet_units"] == 2 * (n - k)  # the transformer's calls are the ones counted
    assert s["ours.B_npi"]["unet_units"] == 2 * n
    assert run["checks"]["cached_sweep_latent_max_diff"] == 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"--config sd3 needs a CUDA GPU .*--config sd3-cpu"):
            bench_edit.parse_args(["--config", "sd3"])


def test_the_vae_decodes_large_images_a_few_at_a_time_with_the_same_pixels(tiny_pipe):
    """Six 1024 px variants through SDXL's fp32 VAE in one call took 28 GB on an H200; the decoder now takes at most
    DECODE_PIXELS output pixels per call. The images are those of decoding each alone."""
    from nonrigid.models.sd import DECODE_PIXELS, vae_decode

    vae = tiny_pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = 1024 // factor  # latents of 1024 px images
    latents = torch.randn(3, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    batches: list[int] = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        together = vae_decode(vae, latents)
        small = vae_decode(vae, latents[:, :, :8, :8])  # 8 * factor px: a full batch of 3 in one call
    finally:
        hook.remove()
    assert DECODE_PIXELS // (1024 * 1024) == 2
    assert batches == [2, 1, 3]
    alone = [vae_decode(vae, latents[i : i + 1])[0] for i in range(3)]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert [im.size for im in small] == [(8 * factor, 8 * factor)] * 3


def test_a_cuda_benchmark_stopped_at_its_time_limit_keeps_the_sections_it_finished(tmp_path):
    """The CUDA configurations run under a time limit on a lent GPU: a run stopped mid-way must leave its finished
    sections on disk, marked partial, and the targets those sections answer must still be judged."""
    import bench_edit

    class Stopped(Exception):
        pass

    path = tmp_path / "cuda.json"
    saves = []

    def save(run):
        path.write_text(json.dumps(bench_edit.asdict(run)))
        saves.append(len(run.sections))
        if len(saves) == 5:  # keys, A and B, C, the whole edit, one more variant: then "the limit"
            raise Stopped

    args = bench_edit.argparse.Namespace(config="cuda", layout="tiny", size=64, threads=1, dtype="bf16",
                                         compile=False, quick=True, mini=False, mini_scenes=1)
    plan = bench_edit.EditPlan(num_steps=5, opt_steps=3, inner_steps=2, inject=0.4)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Stopped):  # the GPU code path, run on the CPU
            bench_edit.run_cuda(args, plan, device=torch.device("cpu"), save=save)
    finally:
        torch.set_num_threads(threads)
    assert saves == [1, 2, 3, 4, 5]
    run = bench_edit.Run(**json.loads(path.read_text()))
    assert run.environment["partial"] is True
    assert list(run.sections) == ["ours.keys", "ours.AB", "ours.C", "ours.edit", "ours.extra_variant"]
    rows = {target: (measured, met) for target, measured, met in bench_edit.targets(run)}
    assert rows["default edit at 64 px within 10 s"][1] is True  # judged from the sections that finished
    assert rows["each additional variant within 0.3 s"][0].endswith("one extra variant alone")
    assert rows["peak GPU memory within 8 GB (--low-memory)"] == (bench_edit.NOT_REACHED, "not measured")
    block = bench_edit.render_block(run)
    assert "**Partial: the run stopped (a time limit) after 5 sections" in block


def test_the_flux_benchmark_inverts_with_the_stand_in_for_nti_and_its_cached_stages_reload(tmp_path):
    """FLUX has no null text: its benchmark inverts with the plain inversion at the distilled guidance (one
    transformer call per step), measures no NPI, and the sweep from the cached stages (an inversion record without
    an unconditional conditioning, which the stage cache once failed to write) equals stage C."""
    import bench_edit

    run, s, (n, k, variants) = quick_benchmark(tmp_path, "flux-cpu")
    assert "FLUX layout" in run["environment"]["family"] and run["environment"]["guidance_scale"] == 3.5
    assert "ours.B_npi" not in s and s["ours.B"]["unet_units"] == s["ours.B"]["unet_calls"] == n
    assert s["ours.C"]["unet_units"] == variants * (n - k) + k  # one branch; the K source steps computed once
    assert s["ours.extra_variant"]["unet_units"] == n
    assert run["checks"]["cached_sweep_latent_max_diff"] == 0
    assert "B inversion (plain, FLUX's stand-in for NTI, alone)" in bench_edit.render_block(bench_edit.Run(**run))


def test_the_gpu_script_dry_runs_on_the_cpu_and_plans_every_cuda_block(tmp_path, capsys):
    """``benchmarks/gpu_all.sh --dry-run`` runs a GPU configuration's code path on the CPU with a tiny model (here
    FLUX's, the cheapest) and writes its block into a copy of the page; the plan covers every CUDA block the issues
    ask for within one device call."""
    import gpu_all

    assert gpu_all.main(["--dry-run", "--only", "flux", "--results", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "flux.json").read_text())
    assert run["environment"]["dry_run"] is True and run["environment"]["layout"] == "tiny-flux"
    assert {"ours.edit", "ours_low_memory.edit", "ours.extra_variant"} <= set(run["sections"])
    assert "Dry run (`--dry-run`)" in capsys.readouterr().out  # the block, as written into the page's copy
    plan = {config: flags for config, flags, _ in gpu_all.PLAN}
    assert set(plan) == {"cuda", "sdxl", "sd3", "flux", "editors"}
    assert {"--fast", "--cuda-graphs"} <= set(plan["cuda"]) and "--fast" in plan["sdxl"]
    assert sum(limit for _, _, limit in gpu_all.PLAN) <= gpu_all.BUDGET_S <= 600


def test_the_gpu_script_dry_runs_both_instruction_editors_and_plans_them_last(tmp_path, capsys):
    """``gpu_all.sh --dry-run --only editors``: ``bench_editors.py`` builds the tiny Kontext and Qwen-Image-Edit-2509
    layouts the way it builds the real ones (meta device, then filled in place), edits through the methods with
    their defaults but two steps, by default and in low-memory mode, and its block lands in the page's copy with
    both methods' rows. The plan keeps ``cuda`` first, measures the editors last and fits one device call."""
    import gpu_all

    assert gpu_all.main(["--dry-run", "--only", "editors", "--results", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "editors.json").read_text())
    assert run["environment"]["dry_run"] is True and run["environment"]["partial"] is False and not run["errors"]
    assert list(run["sections"]) == [f"{editor}.{mode}.{edit}" for mode in ("default", "low_memory")
                                     for editor in ("kontext", "qwen-edit") for edit in ("first", "warm")]
    for name, section in run["sections"].items():
        steps = section["params"]["num_steps"]
        assert steps == 2 and section["unet_calls"] == (2 * steps if name.startswith("qwen") else steps)  # true CFG
    assert run["sections"]["kontext.default.first"]["params"]["guidances"] == [2.5]
    assert run["sections"]["qwen-edit.default.first"]["params"]["true_cfg"] == [4.0]
    page = capsys.readouterr().out  # the page's copy, as written
    block = page.split("<!-- bench:editors:start -->")[1].split("<!-- bench:editors:end -->")[0]
    assert "Dry run (`--dry-run`)" in block and "Random weights" in block
    assert block.count("| kontext |") == block.count("| qwen-edit |") == 4
    configs = [config for config, _, _ in gpu_all.PLAN]
    assert configs[0] == "cuda" and configs[-1] == "editors"
    limits = [limit for _, _, limit in gpu_all.PLAN]
    assert sum(limits) <= gpu_all.BUDGET_S and gpu_all.deadlines(limits, gpu_all.BUDGET_S)[-1] == gpu_all.BUDGET_S


def test_the_editor_benchmark_builds_the_real_architectures_without_allocating_them():
    """What a lent GPU would build, built here on the meta device: the real parameter counts of FLUX.1 Kontext
    [dev] (transformer 11.9 B, T5-XXL 4.76 B with its tied token table, CLIP-L 0.12 B) and Qwen-Image-Edit-2509
    (transformer 20.4 B, Qwen2.5-VL-7B 8.29 B, VAE 0.13 B), so the configs cannot first fail on the device."""
    import bench_editors

    counts = {}
    for name, editor in bench_editors.EDITORS.items():
        pipe = bench_editors.empty_pipeline(editor)
        for component, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                assert {p.device.type for p in module.parameters()} == {"meta"}
                counts[f"{name}.{component}"] = round(bench_editors.parameter_count(module) / 1e7)  # 10 M units
    assert counts == {"kontext.transformer": 1190, "kontext.text_encoder_2": 476, "kontext.text_encoder": 12,
                      "kontext.vae": 8, "qwen-edit.transformer": 2043, "qwen-edit.text_encoder": 829,
                      "qwen-edit.vae": 13}
