"""The page: a Gradio Blocks app on :class:`~nonrigid.ui.session.Editor`, the same library calls as the CLI.

Two tabs (edit an uploaded picture; generate a picture with the loaded model, then edit it), each method's knobs
from the catalogue (:mod:`.knobs`), a progress bar fed by the stages' own progress reports, Cancel, the grid with
every variant and a zip to download, and, after an edit with ours, eta and injection sliders that sample one more
variant from the kept stages. Every model call is one job in one queue (``concurrency_id="model"``, limit 1):
methods change attention processors or copy the UNet, so jobs never share the model; waiting jobs see their
place in the queue.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import ImageOps

from ..errors import Cancelled, NonrigidError, first_line
from ..images import load_image, open_image
from ..methods.catalogue import METHODS, fast_summary, method_info, methods_for
from ..models import DEFAULT_MODEL
from .knobs import Knob, all_knobs, params_from
from .session import MAX_UPLOAD_BYTES, Editor, check_upload, examples

BUILT_IN_MODELS = ("mini", "mini-v", "mini-xl", "mini-flow", DEFAULT_MODEL, "stabilityai/stable-diffusion-2-1",
                   "stabilityai/stable-diffusion-xl-base-1.0")
QUEUE = {"concurrency_limit": 1, "concurrency_id": "model"}
# small pictures (the miniature models work at 64 px) fill their box, with visible pixels rather than blur
CSS = """#preview img, #slider-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}
#gallery img {image-rendering: pixelated}"""

INTRO = """# nonrigid
Change what a subject does (pose, action) while who it is and where it is stay. Upload a picture, say what it
should show, press **Edit**. With the paper's method (*ours*) the sliders below the result then sample another
variant from the stages already computed, in a fraction of the time."""


def build_app(editor: Editor) -> gr.Blocks:
    """The page on ``editor`` (its model already loaded)."""
    knobs = all_knobs()
    with gr.Blocks(title="nonrigid", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            model_box = gr.Dropdown(_model_choices(editor.model), value=editor.model, allow_custom_value=True,
                                    label="Model", info="a built-in name, a hub id, a diffusers folder or a file",
                                    scale=3)
            load_button = gr.Button("Load model", scale=1)
            model_info = gr.Markdown(f"Loaded: **{editor.describe()}**")
        edit_key = gr.State("")
        with gr.Tabs() as tabs:
            with gr.Tab("Edit a picture", id="edit"):
                page = _edit_tab(editor, knobs)
            with gr.Tab("Generate, then edit", id="generate"):
                gen = _generate_tab()
        _wire(app, editor, knobs, page, gen, tabs, edit_key, model_box, load_button, model_info)
    return app


# ---- layout


def _edit_tab(editor: Editor, knobs: list[Knob]) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            c["upload"] = gr.File(label="Input image (any format Pillow reads, up to 50 MB and 10,000 px a side)",
                                  file_types=["image"], type="filepath", elem_id="upload")
            c["preview"] = gr.Image(label="As the model sees it (the working size)", interactive=False,
                                    height=220, elem_id="preview")
            c["mask"] = gr.ImageEditor(label="Region to edit (optional): paint where the edit may change the picture;"
                                       " what stays unpainted is kept", type="numpy", sources=(), layers=False,
                                       transforms=(), brush=gr.Brush(colors=["#ffffff"], color_mode="fixed",
                                                                     default_size=12),
                                       eraser=gr.Eraser(), height=260, elem_id="mask")
            c["target"] = gr.Textbox(label="Target prompt", placeholder="a photo of a jumping dog", elem_id="target")
            c["source"] = gr.Textbox(label="Source prompt (optional)", placeholder="what the picture shows now; "
                                     "empty is the paper's default", elem_id="source")
            offered = methods_for(editor.family)
            c["method"] = gr.Dropdown(offered, value=offered[0], label="Method", elem_id="method",
                                      info=method_info(offered[0]).summary)
            c["instruction"] = gr.Textbox(label="Instruction (kontext, qwen-edit; optional)", elem_id="instruction",
                                          placeholder="make the dog jump; empty: made from the target prompt")
            c["knobs"], c["groups"] = _knob_controls(knobs, offered[0])
            with gr.Row():
                c["seeds"] = gr.Textbox("0", label="Seeds", info="comma-separated; each its own text optimization")
                c["size"] = gr.Number(editor.native_size, label="Size (px)", precision=0,
                                      info="about size x size pixels at the picture's own aspect ratio")
                c["crop"] = gr.Checkbox(False, label="Crop to a square", elem_id="crop",
                                        info="as the reference implementations do")
                c["fast"] = gr.Checkbox(False, label="Fast", elem_id="fast",
                                        info=f"ours: {fast_summary()} (no worse on the miniature world's "
                                        "held-out test)")
            with gr.Row():
                c["edit"] = gr.Button("Edit", variant="primary", elem_id="edit-button")
                c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
            listing = examples()
            gr.Examples([[e["image"], e["target"], e["source"]] for e in listing],
                        inputs=[c["upload"], c["target"], c["source"]], label="Examples (miniature-world scenes)",
                        example_labels=[_example_label(e) for e in listing])
        with gr.Column(scale=1):
            c["status"] = gr.Markdown(elem_id="status")
            c["gallery"] = gr.Gallery(label="Grid (input first) and every variant", columns=3, height=420,
                                      elem_id="gallery", object_fit="contain")
            with gr.Group(visible=False) as c["slider_box"]:
                gr.Markdown("**Another variant, in moments.** Releasing a slider samples from the stages this edit "
                            "already computed: no text optimization, no inversion, only the last (N - K) steps.")
                with gr.Row():
                    with gr.Column():
                        c["slider_seed"] = gr.Dropdown(["0"], value="0", label="Seed")
                        c["eta"] = gr.Slider(0, 1, value=0.5, step=0.05, label="eta (higher edits more)",
                                             elem_id="eta")
                        c["inject"] = gr.Slider(0, 1, value=0.2, step=0.02, elem_id="inject",
                                                label="injection ratio (share of source steps)")
                        c["slider_info"] = gr.Markdown(elem_id="slider-info")
                    with gr.Column():
                        c["slider_image"] = gr.Image(label="Variant", interactive=False, height=240,
                                                     elem_id="slider-image")
            c["files"] = gr.File(label="Downloads: the edit as a zip, and each variant", file_count="multiple",
                                 interactive=False, elem_id="downloads")
    return c


def _knob_controls(knobs: list[Knob], shown: str) -> tuple[list[Any], dict[str, Any]]:
    controls, groups = [], {}
    for method in METHODS:
        mine = [k for k in knobs if k.method == method]
        with gr.Group(visible=method == shown) as groups[method]:
            for knob in [k for k in mine if not k.folded]:
                controls.append(_control(knob))
            with gr.Accordion("More settings", open=False):
                for knob in [k for k in mine if k.folded]:
                    controls.append(_control(knob))
    order = [k for m in METHODS for k in sorted((k for k in knobs if k.method == m), key=lambda k: k.folded)]
    knobs[:] = order  # the controls' order
    return controls, groups


def _control(knob: Knob):
    name = f"{knob.method}-{knob.param.name}"
    if knob.control == "number":
        return gr.Number(knob.default, label=knob.label, info=knob.info, minimum=knob.param.low,
                         maximum=knob.param.high, precision=0 if knob.param.kind == "int" else None, elem_id=name)
    if knob.control == "check":
        return gr.Checkbox(knob.default, label=knob.label, info=knob.info, elem_id=name)
    if knob.control == "choice":
        return gr.Dropdown(list(knob.choices), value=knob.default, label=knob.label, info=knob.info, elem_id=name)
    return gr.Textbox(knob.default, label=knob.label, info=knob.info, elem_id=name)


def _generate_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("Make the input with the loaded model (the paper's experiments on generated images), then edit it: "
                "its prompt becomes the source prompt.")
    with gr.Row():
        with gr.Column():
            c["prompt"] = gr.Textbox(label="Source prompt", placeholder="a photo of a red dog standing on grass")
            with gr.Row():
                c["seed"] = gr.Number(0, label="Seed", precision=0)
                c["steps"] = gr.Number(50, label="Steps", precision=0, minimum=1, maximum=1000)
                c["guidance"] = gr.Number(None, label="Guidance (empty: the model's default)")
            c["go"] = gr.Button("Generate", variant="primary")
        with gr.Column():
            c["image"] = gr.Image(label="Generated", interactive=False, type="filepath", height=320)
            c["use"] = gr.Button("Edit this picture")
    return c


# ---- behaviour


def _wire(app, editor: Editor, knobs: list[Knob], page: dict, gen: dict, tabs, edit_key, model_box, load_button,
          model_info) -> None:
    def edit(image, target, source, method, seeds, size, crop, fast, mask, instruction, values, progress, request):
        report = editor.reporter(_session(request), _progress_to(progress))
        try:
            outcome = editor.edit(image, target, method=method, params=params_from(knobs, values, method),
                                  source_prompt=source or "", seeds=_seeds(seeds), size=_size(size),
                                  crop="square" if crop else None, fast=bool(fast), mask=painted(mask),
                                  progress=report, instruction=(instruction or "").strip() or None)
        except Cancelled:
            gr.Warning("Cancelled: nothing of the unfinished stage was kept")
            return [gr.skip()] * 11
        except NonrigidError as err:
            raise gr.Error(first_line(err)) from None
        gallery = [(str(outcome.grid), "grid"), *((str(p), caption) for p, caption in outcome.variants)]
        stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in outcome.timings.items() if k != "total")
        status = (f"**{outcome.method}**: {len(outcome.variants)} variants in {outcome.seconds:.1f} s ({stages}). "
                  f"Saved to `{outcome.folder}`.")
        slider = outcome.resampleable
        seeds_kept = [str(s) for s in outcome.seeds]
        return (gallery, [str(outcome.archive), *(str(p) for p, _ in outcome.variants)], status, outcome.key,
                gr.Group(visible=slider), gr.Dropdown(seeds_kept, value=seeds_kept[0]),
                gr.Slider(value=outcome.etas[0] if slider else 0.5),
                gr.Slider(value=outcome.inject[0] if slider else 0.2), None, "", gr.skip())

    def resample(key, seed, eta, inject, progress=gr.Progress(), request: gr.Request = None):  # noqa: B008
        if not key:
            raise gr.Error("make an edit with ours first; the sliders sample from its stages")
        report = editor.reporter(_session(request), _progress_to(progress))
        try:
            out = editor.resample(key, int(seed), float(eta), float(inject), progress=report)
        except Cancelled:
            return gr.skip(), "Cancelled"
        except NonrigidError as err:
            raise gr.Error(first_line(err)) from None
        return str(out.image), (f"eta {float(eta):g}, injection {float(inject):g}: {out.seconds:.2f} s for "
                                f"{out.sampled_steps} of {out.num_steps} steps (stage C only)")

    def generate(prompt, seed, steps, guidance, progress=gr.Progress(),  # noqa: B008
                 request: gr.Request = None):
        report = editor.reporter(_session(request), _progress_to(progress))
        try:
            return str(editor.generate(prompt, seed=int(seed or 0), num_steps=int(steps or 50),
                                       guidance_scale=None if guidance in (None, "") else float(guidance),
                                       progress=report))
        except Cancelled:
            return gr.skip()
        except NonrigidError as err:
            raise gr.Error(first_line(err)) from None

    def preview(image, size, crop):
        if not image:
            return None, ""
        try:
            path = check_upload(image)
            picture = open_image(path, name=path.name)
            return load_image(picture, _size(size) or editor.native_size, "square" if crop else None,
                              editor.family.latent_multiple), ""
        except NonrigidError as err:
            return None, f"**{first_line(err)}**"

    def canvas(image):
        """The mask's canvas: the whole upright picture (the mask covers it all, whatever the crop), at most 512
        px a side; nothing painted yet."""
        if not image:
            return None
        try:
            path = check_upload(image)
            picture = ImageOps.exif_transpose(open_image(path, name=path.name)).convert("RGB")
        except NonrigidError:
            return None
        picture.thumbnail((512, 512))
        return {"background": np.asarray(picture), "layers": [], "composite": None}

    def load(name):
        try:
            described = editor.load(name)
        except NonrigidError as err:
            raise gr.Error(first_line(err)) from None
        return f"Loaded: **{described}**", editor.native_size, "", gr.Group(visible=False), _offered(editor)

    def cancel(request: gr.Request = None):
        editor.cancel(_session(request))

    def page_closed(request: gr.Request = None):
        editor.close_page(_session(request))

    inputs = [page["upload"], page["target"], page["source"], page["method"], page["seeds"], page["size"],
              page["crop"], page["fast"], page["mask"], page["instruction"], *page["knobs"]]
    outputs = [page["gallery"], page["files"], page["status"], edit_key, page["slider_box"], page["slider_seed"],
               page["eta"], page["inject"], page["slider_image"], page["slider_info"], page["preview"]]
    edit_event = page["edit"].click(_spelled_out(edit, knobs), inputs, outputs, api_name="edit", **QUEUE)
    slider_inputs = [edit_key, page["slider_seed"], page["eta"], page["inject"]]
    slider_outputs = [page["slider_image"], page["slider_info"]]
    eta_event = page["eta"].release(resample, slider_inputs, slider_outputs, api_name="resample", **QUEUE)
    inject_event = page["inject"].release(resample, slider_inputs, slider_outputs, api_name=False, **QUEUE)
    gen_event = gen["go"].click(generate, [gen["prompt"], gen["seed"], gen["steps"], gen["guidance"]], gen["image"],
                                api_name="generate", **QUEUE)
    page["cancel"].click(cancel, None, None, api_name="cancel", queue=False,
                         cancels=[edit_event, eta_event, inject_event, gen_event])
    page["upload"].change(preview, [page["upload"], page["size"], page["crop"]], [page["preview"], page["status"]],
                          api_name=False, queue=False)
    page["upload"].change(canvas, page["upload"], page["mask"], api_name=False, queue=False)
    page["crop"].change(preview, [page["upload"], page["size"], page["crop"]], [page["preview"], page["status"]],
                        api_name=False, queue=False)
    page["method"].change(lambda m: [gr.Group(visible=m == name) for name in METHODS]
                          + [gr.Dropdown(info=method_info(m).summary)],
                          page["method"], [*page["groups"].values(), page["method"]], api_name=False, queue=False)
    gen["use"].click(lambda img, prompt: (img, prompt, gr.Tabs(selected="edit")), [gen["image"], gen["prompt"]],
                     [page["upload"], page["source"], tabs], api_name=False, queue=False)
    load_button.click(load, model_box, [model_info, page["size"], edit_key, page["slider_box"], page["method"]],
                      api_name="load_model", **QUEUE)
    # a page opened (or reloaded) after a model was loaded from another page shows that model and its methods
    app.load(lambda: (f"Loaded: **{editor.describe()}**", editor.native_size, _offered(editor)), None,
             [model_info, page["size"], page["method"]], api_name=False, queue=False)
    # a closed tab (its heartbeat connection gone) stops its job at the next step: the queue is not held for
    # results nobody will see; Gradio itself only drops the jobs still waiting
    app.unload(page_closed)


def _offered(editor: Editor) -> gr.Dropdown:
    """The method choice offering the methods the loaded model runs (an instruction editor's own only on its
    model; on Qwen-Image-Edit nothing else), the first selected."""
    offered = methods_for(editor.family)
    return gr.Dropdown(choices=offered, value=offered[0], info=method_info(offered[0]).summary)


EDIT_INPUTS = ("image", "target", "source", "method", "seeds", "size", "crop", "fast", "mask", "instruction")


def painted(value: Any) -> np.ndarray | None:
    """The mask an editor value holds: white (255) where any stroke was painted, at the canvas's size; None when
    nothing was painted (the whole picture may change)."""
    if not isinstance(value, dict) or not value.get("layers"):
        return None
    layers = [np.asarray(layer) for layer in value["layers"] if layer is not None]
    alpha = [layer[..., 3] if layer.ndim == 3 and layer.shape[-1] == 4 else layer.max(axis=-1) if layer.ndim == 3
             else layer for layer in layers]
    strokes = np.max(np.stack(alpha), axis=0) > 0 if alpha else None
    if strokes is None or not strokes.any():
        return None
    return np.where(strokes, 255, 0).astype(np.uint8)


def _spelled_out(handler: Callable, knobs: list[Knob]) -> Callable:
    """The edit handler as Gradio calls it: the inputs, one argument per knob, then Gradio's progress tracker and
    the request. Its signature names every knob (``ours_num_steps``), so API clients set knobs by name and leave
    the others at their defaults; ``handler`` gets the knob values as one list."""
    fixed = len(EDIT_INPUTS)

    def call(*args):
        return handler(*args[:fixed], list(args[fixed:-2]), *args[-2:])

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    # A None default makes a parameter optional for API clients (Gradio's rule): the mask (an empty canvas has no
    # value) and, since defaults must trail, the knobs after it, whose components' own values are what clients send.
    optional = EDIT_INPUTS.index("mask")
    call.__signature__ = inspect.Signature([
        *(inspect.Parameter(name, positional, **({"default": None} if i >= optional else {}))
          for i, name in enumerate(EDIT_INPUTS)),
        *(inspect.Parameter(k.api_name, positional, default=None) for k in knobs),
        inspect.Parameter("progress", positional, default=gr.Progress()),  # how Gradio finds its progress tracker
        inspect.Parameter("request", positional, default=None, annotation=gr.Request),
    ])
    call.__annotations__ = {"request": gr.Request}
    return call


def _progress_to(progress: gr.Progress) -> Callable[[str, int, int], None]:
    def show(stage: str, done: int, total: int) -> None:
        progress((done, total), desc=stage, unit="steps")

    return show


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _seeds(text: Any) -> tuple[int, ...]:
    from ..errors import UsageError

    try:
        seeds = tuple(int(s) for s in str(text).replace(" ", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"seeds are whole numbers separated by commas, got {text!r}") from None
    if not seeds:
        raise UsageError("give at least one seed")
    return seeds


def _size(size: Any) -> int | None:
    return None if size in (None, "", 0) else int(size)


def _example_label(example: dict[str, str]) -> str:
    """``brown dog: standing -> jumping``, from the example's captions (``a photo of a brown dog standing ...``)."""
    before, after = example["source"].split(), example["target"].split()
    changed = [f"{a} -> {b}" for a, b in zip(before, after, strict=False) if a != b]
    return f"{' '.join(before[4:6])}: {', '.join(changed)}"


def _model_choices(current: str) -> list[str]:
    return list(dict.fromkeys([current, *BUILT_IN_MODELS]))


# ---- serving


def launch(editor: Editor, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True, quiet: bool = False):
    """Serve the page. Only the output folder, the bundled examples and Gradio's own upload cache (moved into
    the output folder) are served; uploads over 50 MB are refused by the server itself."""
    from .session import EXAMPLES

    editor.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(editor.out / ".uploads"))
    app = build_app(editor)
    app.queue(default_concurrency_limit=1)
    # Gradio's own lines would tell a user of this page to "set `share=True` in `launch()`"; the address is said
    # here, and the caller says how to ask for a public link
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
               allowed_paths=[str(editor.out), str(EXAMPLES)], max_file_size=MAX_UPLOAD_BYTES,
               footer_links=["api"], show_error=True, css=CSS)
    if not quiet:
        print(f"* Running on local URL:  {app.local_url}", flush=True)
    if block:
        app.block_thread()
    return app


def examples_dir() -> Path:
    from .session import EXAMPLES

    return EXAMPLES
