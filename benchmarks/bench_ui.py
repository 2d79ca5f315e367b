"""How quick the web page is: seconds from Edit to grid, and per slider move, against the UNet time a slider
move cannot avoid ((N - K) of N sampling steps). Optionally drives the page in Chromium and saves a screenshot.

    python benchmarks/bench_ui.py                       # the miniature model, the paper's default settings
    python benchmarks/bench_ui.py --screenshot docs/ui.png

Runs ``nonrigid ui`` in this process on 127.0.0.1; the edit goes through the page's API (``gradio_client``), as
a browser's would. The target in the issue: a slider move within 10% of the UNet time of its steps.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

EXAMPLE = "brown-dog-standing-on-sand.png"
TARGET = "a photo of a brown dog jumping on sand"
MOVES = ((0.4, 0.2), (0.8, 0.2), (1.0, 0.1), (0.6, 0.3), (0.2, 0.4))  # (eta, injection ratio)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UNetClock:
    """Wall time spent inside the UNet's forward (hooks around it)."""

    def __init__(self, unet) -> None:
        self.seconds, self.calls, self._tick = 0.0, 0, 0.0
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        self._tick = time.perf_counter()

    def _stop(self, *_) -> None:
        self.seconds += time.perf_counter() - self._tick
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def measure(model: str, out: Path) -> dict:
    from gradio_client import Client, handle_file

    from nonrigid.ui.app import launch
    from nonrigid.ui.session import EXAMPLES, Editor

    editor = Editor(model, out, cache_dir=out / "cache")
    editor.load()
    clock = UNetClock(editor.pipe.unet)
    port = free_port()
    app = launch(editor, port=port, block=False, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    tick = time.perf_counter()
    client.predict(image=handle_file(str(EXAMPLES / EXAMPLE)), target=TARGET, source="", api_name="/edit")
    edit_seconds = time.perf_counter() - tick
    moves = []
    for eta, inject in MOVES:
        clock.reset()
        tick = time.perf_counter()
        _, info = client.predict(seed="0", eta=eta, inject=inject, api_name="/resample")
        server = float(info.split(": ")[1].split(" s ")[0])  # "eta 0.4, injection 0.2: 2.31 s for 40 of 50 ..."
        moves.append({"eta": eta, "inject": inject, "seconds": time.perf_counter() - tick, "server_seconds": server,
                      "unet_seconds": clock.seconds, "unet_calls": clock.calls})
    app.close()
    return {"model": model, "edit_seconds": edit_seconds, "moves": moves}


def screenshot(model: str, out: Path, path: Path) -> None:
    """The page as a person uses it: an example picked, Edit pressed, the eta slider dragged."""
    from playwright.sync_api import sync_playwright

    from nonrigid.ui.app import launch
    from nonrigid.ui.session import Editor

    editor = Editor(model, out, cache_dir=out / "cache")
    editor.load()
    port = free_port()
    app = launch(editor, port=port, block=False, quiet=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_text("brown dog: standing -> jumping").click()
        page.wait_for_selector("#preview img")
        page.locator("#edit-button").click()
        page.wait_for_selector("#eta input[type=range]", timeout=600_000)
        box = page.locator("#eta input[type=range]").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2, steps=4)
        page.mouse.up()
        page.wait_for_function("document.querySelector('#slider-info').innerText.includes('stage C only')",
                               timeout=120_000)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    app.close()


def report(result: dict) -> str:
    moves = result["moves"]
    lines = [f"model {result['model']}: Edit to grid {result['edit_seconds']:.1f} s (the paper's defaults: 200 "
             "text-optimization steps, 50 NTI steps x 10, 6 etas)", "",
             "| eta | inject | UNet calls | slider move, page (s) | sampling in the server (s) | UNet time (s) | "
             "overhead |", "|---|---|---|---|---|---|---|"]
    for m in moves:
        overhead = m["seconds"] / m["unet_seconds"] - 1
        lines.append(f"| {m['eta']:g} | {m['inject']:g} | {m['unet_calls']} | {m['seconds']:.3f} | "
                     f"{m['server_seconds']:.2f} | {m['unet_seconds']:.3f} | {overhead:+.0%} |")
    median = statistics.median(m["seconds"] / m["unet_seconds"] - 1 for m in moves)
    lines.append(f"\nmedian overhead of a slider move over its UNet time: {median:+.0%}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--screenshot", type=Path, default=None, help="also save the page in Chromium here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(report(measure(args.model, Path(tmp) / "measure")))
        if args.screenshot:
            screenshot(args.model, Path(tmp) / "shot", args.screenshot)
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
