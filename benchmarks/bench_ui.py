"""How quick the web page is: seconds from Edit to grid, and per slider move, against the UNet time a slider
move cannot avoid ((N - K) of N sampling steps). Optionally drives the page in Chromium and saves a screenshot.

    python benchmarks/bench_ui.py                       # the miniature model, the paper's default settings
    python benchmarks/bench_ui.py --screenshot docs/ui.png     # and slider moves timed in Chromium

Runs ``nonrigid ui`` in this process on 127.0.0.1; the edit goes through the page's API (``gradio_client``), as
a browser's would. The target in the issue: a slider move within 10% of the UNet time of its steps.
"""

from __future__ import annotations

import argparse
import re
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
    """Wall time spent inside the denoiser's forward (hooks around it)."""

    def __init__(self, network) -> None:
        self.seconds, self.calls, self._tick = 0.0, 0, 0.0
        network.register_forward_pre_hook(self._start)
        network.register_forward_hook(self._stop)

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
    clock = UNetClock(editor.family.network)
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


def browser(model: str, out: Path, path: Path | None) -> list[dict]:
    """The page as a person uses it, in Chromium: an example picked, Edit pressed, then slider moves timed from
    the mouse release to the new variant's line on the page; a screenshot at the end."""
    from playwright.sync_api import sync_playwright

    from nonrigid.ui.app import launch
    from nonrigid.ui.session import Editor

    editor = Editor(model, out, cache_dir=out / "cache")
    editor.load()
    clock = UNetClock(editor.family.network)
    port = free_port()
    app = launch(editor, port=port, block=False, quiet=True)
    moves = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1300, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_text("brown dog: standing -> jumping").click()
        page.wait_for_selector("#preview img")
        page.locator("#edit-button").click()
        page.wait_for_selector("#eta input[type=range]", timeout=600_000)
        slider = page.locator("#eta input[type=range]")
        slider.scroll_into_view_if_needed()  # the page is taller than the window: click where it is on screen
        box = slider.bounding_box()
        for share in (0.3, 0.6, 0.9):
            clock.reset()
            tick = time.perf_counter()
            page.mouse.click(box["x"] + box["width"] * share, box["y"] + box["height"] / 2)
            eta = float(page.locator("#eta input[type=number]").input_value())
            # the variant's line (the progress overlay inside the same element says other things meanwhile)
            line = re.compile(rf"eta {eta:g}, injection [0-9.]+: ([0-9.]+) s for \d+ of \d+ steps \(stage C only\)")
            page.wait_for_function("([pattern]) => new RegExp(pattern).test("
                                   "document.querySelector('#slider-info').innerText)", arg=[line.pattern],
                                   timeout=120_000)
            seconds = time.perf_counter() - tick
            found = line.search(page.locator("#slider-info").inner_text())
            moves.append({"info": found.group(0).split(":")[0], "seconds": seconds, "unet_seconds": clock.seconds,
                          "server_seconds": float(found.group(1))})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(path), full_page=True)
        chromium.close()
    app.close()
    return moves


def browser_report(moves: list[dict]) -> str:
    lines = ["in Chromium, from the mouse release on the eta slider to the new variant on the page:", "",
             "| move | page (s) | sampling in the server (s) | UNet time (s) | page over UNet |",
             "|---|---|---|---|---|"]
    for m in moves:
        lines.append(f"| {m['info']} | {m['seconds']:.2f} | {m['server_seconds']:.2f} | "
                     f"{m['unet_seconds']:.2f} | {m['seconds'] / m['unet_seconds'] - 1:+.0%} |")
    return "\n".join(lines)


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
    parser.add_argument("--browser", action="store_true", help="also time slider moves in Chromium")
    parser.add_argument("--screenshot", type=Path, default=None, help="also save the page in Chromium here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(report(measure(args.model, Path(tmp) / "measure")))
        if args.browser or args.screenshot:
            print(browser_report(browser(args.model, Path(tmp) / "browser", args.screenshot)))
        if args.screenshot:
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
