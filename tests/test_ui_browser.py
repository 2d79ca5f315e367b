"""The page in a real browser: headless Chromium (Debian's package; Playwright cannot download its own browsers
here) driven by Playwright, against ``nonrigid ui`` on 127.0.0.1 with the tiny model.

A person's path through the page: upload a TEdBench photo, type the target prompt, fold out the rarely used
settings to make the edit quick, press Edit, wait for the grid, drag the eta slider and see a new variant.
Screenshots of each step are saved (``NONRIGID_SCREENSHOTS`` names a folder to keep them in).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the ui extra (gradio) is part of the dev install")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is part of the dev install")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from nonrigid.ui.app import launch
    from nonrigid.ui.session import Editor

    root = tmp_path_factory.mktemp("ui-browser")
    editor = Editor("tiny", root / "out", cache_dir=root / "cache")
    editor.load()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(editor, port=port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", editor
    app.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium package)")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_upload_edit_and_move_the_eta_slider_in_a_real_browser(page_url, browser, tedbench, tmp_path):
    url, editor = page_url
    shots = Path(os.environ.get("NONRIGID_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(url)
    page.wait_for_selector("#edit-button")

    page.locator("#upload input[type=file]").set_input_files(str(tedbench / "originals" / "dog_01.jpeg"))
    page.wait_for_selector("#preview img")  # the page shows the input as the model will see it
    page.locator("#target textarea").fill("A photo of a jumping dog.")
    page.locator("#ours-num_steps input").fill("8")
    page.get_by_text("More settings").first.click()
    page.locator("#ours-opt_steps input").fill("3")
    page.locator("#ours-inner_steps input").fill("2")
    page.locator("#ours-etas textarea, #ours-etas input").first.fill("0,1")
    page.screenshot(path=str(shots / "ui-1-ready.png"), full_page=True)

    page.locator("#edit-button").click()
    page.wait_for_selector("#gallery img", timeout=120_000)
    page.wait_for_selector("#eta input[type=range]", timeout=30_000)
    status = page.locator("#status").inner_text()
    assert "ours" in status and "2 variants" in status
    assert page.locator("#gallery img").count() >= 3  # the grid and both variants
    folders = [p for p in editor.out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "edit.json").is_file()  # written to disk as the CLI would
    page.screenshot(path=str(shots / "ui-2-edited.png"), full_page=True)

    slider = page.locator("#eta input[type=range]")
    slider.scroll_into_view_if_needed()  # the page is taller than the window: drag where the slider is on screen
    box = slider.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.wait_for_selector("#slider-image img", timeout=60_000)
    page.wait_for_function("document.querySelector('#slider-info').innerText.includes('stage C only')",
                           timeout=60_000)
    info = page.locator("#slider-info").inner_text()
    assert "of 8 steps" in info
    eta = float(info.split(",")[0].removeprefix("eta "))
    assert 0.5 < eta < 0.9  # the value the drag left the slider at
    slider_files = list(folders[0].glob("slider/*.png"))
    assert len(slider_files) == 1 and f"eta{eta:.2f}" in slider_files[0].name
    page.screenshot(path=str(shots / "ui-3-slider.png"), full_page=True)


def test_a_decompression_bomb_gets_the_size_message_on_upload_and_on_edit(page_url, browser, tmp_path):
    from conftest import write_bomb_png

    url, editor = page_url
    bomb = write_bomb_png(tmp_path / "bomb.png")  # its header claims 20,000 x 20,000 px
    message = "image bomb.png is over 10,000 px a side; images up to 10,000 px a side are accepted"
    before = sorted(editor.out.glob("2*"))
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(url)
    page.wait_for_selector("#edit-button")
    page.locator("#upload input[type=file]").set_input_files(str(bomb))
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({message!r})", timeout=30_000)
    page.locator("#target textarea").fill("A photo of a jumping dog.")
    page.locator("#edit-button").click()
    page.locator("[data-testid=toast-body]").filter(has_text=message).wait_for(timeout=30_000)  # Edit's error
    assert page.get_by_text("could be decompression bomb").count() == 0  # never Pillow's own words
    assert sorted(editor.out.glob("2*")) == before
    page.close()


def test_closing_the_tab_cancels_its_running_edit(page_url, browser):
    import time

    from nonrigid.ui.session import EXAMPLES

    url, editor = page_url
    before = sorted(editor.out.glob("2*"))
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(url)
    page.wait_for_selector("#edit-button")
    page.locator("#upload input[type=file]").set_input_files(str(EXAMPLES / "brown-dog-standing-on-sand.png"))
    page.wait_for_selector("#preview img")
    page.locator("#target textarea").fill("a photo of a brown dog jumping on sand")
    page.locator("#ours-num_steps input").fill("8")
    page.get_by_text("More settings").first.click()
    page.locator("#ours-opt_steps input").fill("3")
    page.locator("#ours-inner_steps input").fill("10000")  # minutes of null-text inversion, if nothing stops it
    page.locator("#edit-button").click()
    progress = page.locator(".progress-level-inner").filter(has_text="null-text inversion")  # the bar names the stage
    progress.first.wait_for(timeout=60_000)
    assert editor.lock.locked()  # the edit runs
    page.close()
    tick = time.perf_counter()
    while editor.lock.locked() and time.perf_counter() - tick < 60:
        time.sleep(0.05)
    assert time.perf_counter() - tick < 20  # the server hears of the closed tab, then the next step stops the job
    assert sorted(editor.out.glob("2*")) == before


def test_paint_a_region_edit_and_the_rest_stays_in_a_real_browser(page_url, browser, tmp_path):
    """Issue 28: a brush on the input marks where the edit may change the picture; outside the stroke the variants
    keep the reconstruction's pixels (what an all-black mask gives), inside it they are edited."""
    import json

    import numpy as np
    from PIL import Image

    from nonrigid.ui.session import examples

    url, editor = page_url
    shots = Path(os.environ.get("NONRIGID_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    page.wait_for_selector("#edit-button")
    page.locator("#upload input[type=file]").set_input_files(examples()[0]["image"])
    page.wait_for_selector("#preview img")
    canvas = page.locator("#mask canvas").first
    page.wait_for_function("document.querySelectorAll('#mask canvas').length > 0")
    page.locator("#mask button[aria-label='Brush']").click()
    box = canvas.bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.35 * w, y + 0.55 * h)
    page.mouse.down()
    for step in range(12):  # a thick stroke across the middle of the picture
        page.mouse.move(x + (0.35 + 0.3 * step / 11) * w, y + 0.55 * h, steps=2)
    page.mouse.up()
    page.locator("#target textarea").fill("a photo of a brown dog jumping on sand")
    page.locator("#ours-num_steps input").fill("6")
    page.get_by_text("More settings").first.click()
    page.locator("#ours-opt_steps input").fill("2")
    page.locator("#ours-inner_steps input").fill("1")
    page.locator("#ours-etas textarea, #ours-etas input").first.fill("0,1")
    page.screenshot(path=str(shots / "ui-mask-1-painted.png"), full_page=True)
    before = {p.name for p in editor.out.iterdir()}
    page.locator("#edit-button").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('2 variants')", timeout=120_000)
    page.screenshot(path=str(shots / "ui-mask-2-edited.png"), full_page=True)
    (folder,) = [p for p in editor.out.iterdir() if p.is_dir() and p.name not in before and not p.name.startswith(".")]
    record = json.loads((folder / "edit.json").read_text())
    assert record["mask"]  # the mask's digest, as the CLI records it
    edited = np.asarray(Image.open(folder / record["variants"][0]["file"]), dtype=int)
    kept = editor.edit(examples()[0]["image"], "a photo of a brown dog jumping on sand", seeds=(0,),
                       params={"num_steps": 6, "opt_steps": 2, "inner_steps": 1, "etas": (0.0, 1.0)},
                       mask=np.zeros((64, 64), np.uint8))  # nothing may change: the reconstruction
    reconstruction = np.asarray(Image.open(kept.variants[0][0]), dtype=int)
    assert np.abs(edited[:12] - reconstruction[:12]).max() <= 1  # the sky above the stroke: kept
    assert np.abs(edited[30:40, 24:40] - reconstruction[30:40, 24:40]).max() > 10  # under the stroke: edited
