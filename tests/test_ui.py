"""The web UI: its rules without a browser (uploads, cancelling, the knobs from the catalogue, the bundled
examples) and its API as a client drives it, against a server on 127.0.0.1 with the tiny model.

The page must give what the library gives: an edit through the page equals ``run_method`` with the same
parameters, and a slider move equals the variant an edit with that eta and injection ratio makes, while costing
only the last N - K UNet calls.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, write_bomb_png
from PIL import Image

from nonrigid import run_method
from nonrigid.errors import Cancelled, UsageError
from nonrigid.images import open_image
from nonrigid.methods.base import resolve_params
from nonrigid.methods.catalogue import METHODS, method_info
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache
from nonrigid.ui.knobs import all_knobs, params_from
from nonrigid.ui.session import EXAMPLES, Editor, check_upload, examples

gradio = pytest.importorskip("gradio", reason="the ui extra (gradio) is part of the dev install")
from gradio_client import Client, handle_file  # noqa: E402

# small settings every page edit here uses: the tiny model at 64 px, a few steps of every stage
FAST = {"ours_num_steps": 8, "ours_opt_steps": 3, "ours_inner_steps": 2, "ours_etas": "0,1", "ours_inject": "0.25"}
FAST_PARAMS = {"num_steps": 8, "opt_steps": 3, "inner_steps": 2, "etas": (0.0, 1.0), "inject": (0.25,)}
EXAMPLE = EXAMPLES / "brown-dog-standing-on-sand.png"
TARGET = "a photo of a brown dog jumping on sand"


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ---- the knobs come from the catalogue


def test_every_parameter_of_every_method_has_a_control_with_the_catalogue_default():
    knobs = all_knobs()
    for method in METHODS:
        mine = [k for k in knobs if k.method == method]
        assert [k.param for k in mine] == list(method_info(method).params)
        # controls left at their defaults set nothing: the method applies its own defaults (and the family's)
        assert params_from(knobs, [k.default for k in knobs], method) == {}


def test_a_changed_control_becomes_the_parameter_the_cli_would_set():
    knobs = all_knobs()
    values = [k.default for k in knobs]
    changed = {"etas": "0.3,0.7", "num_steps": 20, "inversion": "ddim"}
    for i, k in enumerate(knobs):
        if k.method == "ours" and k.param.name in changed:
            values[i] = changed[k.param.name]
    params = params_from(knobs, values, "ours")
    assert params == changed
    resolved = resolve_params(method_info("ours"), params)
    assert resolved["etas"] == (0.3, 0.7) and resolved["num_steps"] == 20 and resolved["inversion"] == "ddim"
    # a value out of the catalogue's bounds is refused with the catalogue's message
    values[next(i for i, k in enumerate(knobs) if k.api_name == "ours_etas")] = "0.5,1.5"
    with pytest.raises(UsageError, match="etas must be <= 1"):
        resolve_params(method_info("ours"), params_from(knobs, values, "ours"))


# ---- uploads


def test_uploads_that_are_not_images_too_large_or_too_wide_are_refused_before_decoding(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(UsageError, match=r"notes\.png is not an image Pillow can read"):
        check_upload(text)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:  # a sparse 51 MB file: refused by its size, never read
        f.truncate(51 * 1024 * 1024)
    with pytest.raises(UsageError, match="51 MB; images up to 50 MB"):
        check_upload(big)
    wide = tmp_path / "wide.png"
    Image.new("L", (10_001, 2)).save(wide)
    with pytest.raises(UsageError, match="10001 x 2 px; images up to 10,000 px"):
        check_upload(wide)
    bomb = write_bomb_png(tmp_path / "bomb.png")  # its header claims 20,000 x 20,000 px: never decoded
    with pytest.raises(UsageError, match=r"^image bomb\.png is over 10,000 px a side; images up to 10,000 px"):
        check_upload(bomb)
    cut = tmp_path / "cut.png"
    cut.write_bytes(EXAMPLE.read_bytes()[:300])
    path = check_upload(cut)  # the header passes; decoding it, as Editor.edit does, finds the cut
    with pytest.raises(UsageError, match=r"^image cut\.png is damaged or truncated") as caught:
        open_image(path, name=path.name)
    assert str(tmp_path) not in str(caught.value)  # the file's name, not where the server keeps it
    assert check_upload(EXAMPLE) == EXAMPLE


def test_the_bundled_examples_are_scenes_of_the_miniature_world():
    from nonrigid.mini.world import caption, random_scene, render

    listing = examples()
    assert len(listing) >= 3
    for item in json.loads((EXAMPLES / "examples.json").read_text()):
        scene = random_scene(random.Random(item["world_seed"]), item["pose"])
        np.testing.assert_array_equal(pixels(EXAMPLES / item["image"]), np.asarray(render(scene)))
        assert item["source"] == caption(scene.kind, scene.colour, scene.pose, scene.ground)
        assert item["target"] != item["source"] and item["target"].startswith(f"a photo of a {scene.colour}")


# ---- the editor without the page


@pytest.fixture()
def editor(tmp_path, tiny_pipe):
    made = Editor("tiny", tmp_path / "out", cache_dir=tmp_path / "cache")
    made.family = family_of(tiny_pipe)  # the session's tiny model: Editor.load is exercised by the server tests
    return made


def test_cancel_stops_between_steps_writes_nothing_and_keeps_the_cache_whole(editor, tmp_path):
    seen = []

    def cancel_in_the_inversion(stage, done, total):
        seen.append((stage, done))
        if stage == "null-text inversion" and done >= 2:
            editor.cancel("me")

    report = editor.reporter("me", cancel_in_the_inversion)
    with pytest.raises(Cancelled):
        editor.edit(EXAMPLE, TARGET, params=FAST_PARAMS, progress=report)
    stage, done = seen[-1]
    assert stage == "null-text inversion" and 2 <= done < 8 * 2  # it stopped at the next step, not at the end
    assert not editor.out.exists() or not any(editor.out.iterdir())  # no edit folder, no zip
    cache = StageCache(tmp_path / "cache")
    kinds = sorted(p.parent.name for p in cache.root.rglob("*.safetensors"))
    assert kinds == ["text"]  # the finished stage A is kept, the interrupted stage B is not
    # the next edit finishes and equals an edit that was never interrupted (no cache), to a grey level: it inverts
    # alone where the uninterrupted edit inverted alongside the text optimization (the same sums, batched otherwise)
    outcome = editor.edit(EXAMPLE, TARGET, params=FAST_PARAMS, progress=editor.reporter("me"))
    fresh = run_method(editor.family, EXAMPLE, TARGET, "ours", FAST_PARAMS, size=64)
    for (path, _), variant in zip(outcome.variants, fresh.variants, strict=True):
        np.testing.assert_allclose(pixels(path), np.asarray(variant.image), rtol=0, atol=1)


# ---- the page's API, as a client drives it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``nonrigid ui --model tiny`` in this process, on 127.0.0.1, with a UNet call counter."""
    from nonrigid.ui.app import launch

    root = tmp_path_factory.mktemp("ui")
    editor = Editor("tiny", root / "out", cache_dir=root / "cache")
    editor.load()
    calls = []
    editor.family.network.register_forward_hook(lambda *_: calls.append(1))
    port = free_port()
    app = launch(editor, port=port, block=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "editor": editor, "calls": calls, "root": root}
    app.close()


def page_edit(client: Client, target: str = TARGET, **knobs):
    return client.predict(image=handle_file(str(EXAMPLE)), target=target, source="", **{**FAST, **knobs},
                          api_name="/edit")


def test_an_edit_in_the_page_returns_the_grid_and_equals_the_library(server):
    client = Client(server["url"], verbose=False)
    gallery, files, status, *_ = page_edit(client)
    editor = server["editor"]
    folder = max((p for p in editor.out.iterdir() if p.is_dir() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime)
    assert gallery[0]["caption"] == "grid"
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), pixels(folder / "grid.png"))
    assert "2 variants" in status and str(folder) in status
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # as readable as any new folder, not 0700
    library = run_method(editor.family, EXAMPLE, TARGET, "ours", FAST_PARAMS, size=64)
    for shown, variant in zip(gallery[1:], library.variants, strict=True):
        np.testing.assert_array_equal(pixels(shown["image"]), np.asarray(variant.image))
    # the whole edit folder as one zip, in the CLI's layout
    with zipfile.ZipFile(files[0]) as zf:
        names = {Path(n).name for n in zf.namelist()}
        manifest = json.loads(zf.read(f"{folder.name}/edit.json"))
    assert {"input.png", "grid.png", "edit.json", "seed0_K02_eta0.00.png", "seed0_K02_eta1.00.png"} <= names
    assert manifest["method"] == "ours" and manifest["target_prompt"] == TARGET and manifest["model"] == "tiny"


def test_a_slider_release_samples_only_the_last_steps_and_equals_an_edit_with_that_eta(server):
    client = Client(server["url"], verbose=False)
    page_edit(client)
    calls = server["calls"]
    calls.clear()
    image, info = client.predict(seed="0", eta=0.55, inject=0.5, api_name="/resample")
    assert len(calls) == 8 - 4  # N - K UNet calls: no text optimization, no inversion
    assert "4 of 8 steps" in info
    direct = run_method(server["editor"].family, EXAMPLE, TARGET, "ours",
                        {**FAST_PARAMS, "etas": (0.55,), "inject": (0.5,)}, size=64)
    np.testing.assert_array_equal(pixels(image), np.asarray(direct.variants[0].image))


def test_the_progress_bar_names_the_stage_and_its_step(server):
    import time

    client = Client(server["url"], verbose=False)
    job = client.submit(image=handle_file(str(EXAMPLE)), target="a photo of a brown dog sitting on sand", source="",
                        **{**FAST, "ours_opt_steps": 60}, api_name="/edit")
    seen = set()
    while not job.done():
        for unit in job.status().progress_data or []:
            seen.add((unit.desc, unit.length))
        time.sleep(0.02)
    job.result()
    assert ("text optimization", 60) in seen  # the stage's name and its number of steps, as the CLI's bar shows


def test_cancel_in_the_page_stops_the_running_edit_between_steps(server):
    import time

    client = Client(server["url"], verbose=False)
    editor = server["editor"]
    before = sorted(editor.out.glob("*"))
    job = client.submit(image=handle_file(str(EXAMPLE)), target="a photo of a brown dog lying on snow", source="",
                        **{**FAST, "ours_opt_steps": 5000}, api_name="/edit")  # minutes, if nothing stops it
    while not any(u.desc == "text optimization" for u in (job.status().progress_data or [])):
        time.sleep(0.05)
    client.predict(api_name="/cancel")
    tick = time.perf_counter()
    while editor.lock.locked():  # the worker thread lets go of the model at its next step
        time.sleep(0.05)
    assert time.perf_counter() - tick < 10
    assert sorted(editor.out.glob("*")) == before  # nothing written
    assert "variants" in page_edit(client)[2]  # and the next edit runs


def test_closing_the_page_cancels_its_running_edit_at_the_next_step(server, monkeypatch):
    """The page gone (here its client closed, as a closed tab closes its connections), its edit stops at the next
    step as Cancel stops it: the finished stage A stays cached, nothing is written, the next user's edit runs."""
    import time

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")  # how soon a client notices it should hang up
    editor = server["editor"]
    cache = StageCache(server["root"] / "cache").root

    def entries(kind: str) -> int:
        return sum(1 for p in cache.rglob("*.safetensors") if p.parent.name == kind)

    before = sorted(editor.out.glob("*")), entries("text"), entries("inversion")
    client = Client(server["url"], verbose=False)
    job = client.submit(image=handle_file(str(EXAMPLE)), target="a photo of a brown dog rolling on sand", source="",
                        **{**FAST, "ours_inner_steps": 10000}, api_name="/edit")  # minutes, unless stopped
    while not any(u.desc == "null-text inversion" for u in (job.status().progress_data or [])):
        time.sleep(0.05)
    client.close()
    tick = time.perf_counter()
    while editor.lock.locked() and time.perf_counter() - tick < 30:  # let go of the model at its next step
        time.sleep(0.05)
    assert time.perf_counter() - tick < 10
    assert (sorted(editor.out.glob("*")), entries("text"), entries("inversion")) == (before[0], before[1] + 1,
                                                                                      before[2])
    assert "variants" in page_edit(Client(server["url"], verbose=False))[2]  # the queue is free


def test_a_bad_upload_gets_a_message_and_nothing_is_written(server, tmp_path):
    client = Client(server["url"], verbose=False)
    before = sorted(server["editor"].out.glob("*"))
    bad = tmp_path / "holiday.png"
    bad.write_text("this is a text file")
    with pytest.raises(Exception, match=r"holiday\.png is not an image Pillow can read"):
        client.predict(image=handle_file(str(bad)), target=TARGET, source="", api_name="/edit")
    with pytest.raises(Exception, match="write a target prompt"):
        client.predict(image=handle_file(str(EXAMPLE)), target="  ", source="", api_name="/edit")
    # no image: nothing uploaded, or an upload the server refused (over 50 MB) leaves the box empty
    with pytest.raises(Exception, match=r"upload an image first \(or pick an example\)"):
        client.predict(image=None, target=TARGET, source="", api_name="/edit")
    cut = tmp_path / "cut.png"
    cut.write_bytes(EXAMPLE.read_bytes()[:300])
    with pytest.raises(Exception, match=r"image cut\.png is damaged or truncated") as caught:
        client.predict(image=handle_file(str(cut)), target=TARGET, source="", api_name="/edit")
    assert ".uploads" not in str(caught.value) and str(server["root"]) not in str(caught.value)  # the name only
    bomb = write_bomb_png(tmp_path / "bomb.png")
    with pytest.raises(Exception, match=r"image bomb\.png is over 10,000 px a side; images up to 10,000 px"):
        client.predict(image=handle_file(str(bomb)), target=TARGET, source="", api_name="/edit")
    assert sorted(server["editor"].out.glob("*")) == before
    # the server is still up and editing
    assert "variants" in page_edit(client)[2]


def test_two_clients_at_once_both_get_their_own_result(server):
    prompts = ["a photo of a brown dog lying on sand", "a photo of a brown dog sitting on sand"]
    results: dict[str, list] = {}

    def one(prompt: str) -> None:
        results[prompt] = page_edit(Client(server["url"], verbose=False), target=prompt)[0]

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    # The second edit finds the shared inversion cached and optimizes its text alone, where the library run below
    # optimizes it alongside the inversion: the same computation batched differently, equal to a grey level. The
    # two prompts' edits differ by far more, so a mix-up still fails.
    library = {p: run_method(server["editor"].family, EXAMPLE, p, "ours", FAST_PARAMS, size=64) for p in prompts}
    for prompt, other in (prompts, prompts[::-1]):
        for shown, mine, theirs in zip(results[prompt][1:], library[prompt].variants, library[other].variants,
                                       strict=True):
            np.testing.assert_allclose(pixels(shown["image"]), np.asarray(mine.image), rtol=0, atol=1)
            assert np.abs(pixels(shown["image"]) - np.asarray(theirs.image).astype(int)).max() > 8


def test_generate_then_edit_makes_the_input_with_the_loaded_model(server):
    from nonrigid.stages.sampling import generate

    client = Client(server["url"], verbose=False)
    path = client.predict(prompt="a photo of a red dog standing on grass", seed=3, steps=6, guidance=None,
                          api_name="/generate")
    direct = generate(server["editor"].family, "a photo of a red dog standing on grass", seed=3, num_steps=6)
    np.testing.assert_array_equal(pixels(path), np.asarray(direct))
    saved = server["editor"].out / "generated" / "a-photo-of-a-red-dog-standing-on-grass-seed3.png"
    np.testing.assert_array_equal(pixels(saved), np.asarray(direct))


def test_nothing_outside_the_output_folder_and_the_examples_is_served(server):
    import httpx

    secret = server["root"] / "secret.txt"
    secret.write_text("private")
    base = server["url"] + "gradio_api/file="
    assert httpx.get(base + str(secret), timeout=10).status_code == 403
    assert httpx.get(base + str(ROOT / "README.md"), timeout=10).status_code == 403
    assert httpx.get(base + "/etc/passwd", timeout=10).status_code == 403
    assert httpx.get(base + str(EXAMPLE), timeout=10).status_code == 200


def test_the_model_is_switched_from_the_page_and_old_stages_are_dropped(server):
    """(Last of the page tests: it leaves the server on another model.)"""
    client = Client(server["url"], verbose=False)
    page_edit(client)
    editor = server["editor"]
    key = max((p for p in editor.out.iterdir() if p.is_dir() and not p.name.startswith(".")),
              key=lambda p: p.stat().st_mtime).name
    assert editor.resample(key, 0, 0.5, 0.25).sampled_steps == 6  # the edit's stages are there before the switch
    info, size, *_ = client.predict(name="tiny-sd2-v", api_name="/load_model")
    assert "tiny-sd2-v" in info and "v_prediction" in info and size == 96
    assert server["editor"].model == "tiny-sd2-v"
    with pytest.raises(Exception, match="no longer in memory"):  # stages of the old model are not reused
        editor.resample(key, 0, 0.5, 0.25)
    with pytest.raises(Exception, match="no-such-model"):
        client.predict(name="./no-such-model", api_name="/load_model")
    assert server["editor"].model == "tiny-sd2-v"  # a failed load keeps the loaded model


# ---- the command


def test_ui_command_refuses_bad_flags_and_a_missing_gradio_in_one_line(tmp_path):
    def run(*args: str, code: str = "") -> subprocess.CompletedProcess:
        script = f"import sys; {code}from nonrigid.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    bad_port = run("ui", "--model", "tiny", "--port", "70000")
    assert bad_port.returncode == 2
    assert bad_port.stderr.strip() == "nonrigid: error: --port must be between 1 and 65535, got 70000"
    no_gradio = run("ui", "--model", "tiny", code="sys.modules['gradio'] = None; ")
    assert no_gradio.returncode == 2
    assert no_gradio.stderr.strip() == "nonrigid: error: the web page needs Gradio: pip install 'nonrigid[ui]'"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert "is a file; give a folder" in run("ui", "--out", str(not_a_folder)).stderr


def test_ui_command_serves_on_localhost_only(tmp_path):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nonrigid.cli", "ui", "--model", "tiny", "--port", str(port),
                             "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if f"127.0.0.1:{port}" in line:
                break
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), lines
        assert not any("share=True" in line for line in lines), lines  # Gradio's advice to a Python caller
        assert "nonrigid: no public link; --share also makes a gradio.live one\n" in lines  # the flag, named
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert {line.split()[3] for line in listening.splitlines()} == {f"127.0.0.1:{port}"}  # local address
        assert not list((tmp_path / "out").glob("2*"))  # nothing edited, nothing written but the upload cache
    finally:
        proc.terminate()
        proc.wait(timeout=30)
