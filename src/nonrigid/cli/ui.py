"""``nonrigid ui``: the web page on the library, with the model loaded once."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError
from ..models import check_model_name
from .common import HelpFormatter, add_model_flags, add_output_flags, add_runtime_flags, quiet_libraries, say


def add_ui_parser(commands) -> None:
    p = commands.add_parser(
        "ui",
        help="edit in the browser: upload, edit, then move eta / injection sliders for new variants in moments",
        description="Start the web page (Gradio) on 127.0.0.1 and print its address. The model is loaded once (and "
        "can be switched from the page); one job runs at a time, others wait in a queue. Every edit made in the "
        "page is also written to --out in the layout of `nonrigid edit`, with a zip of it. After an edit with the "
        "paper's method, eta and injection sliders sample one more variant from the stages already computed. "
        "Offline quick start: nonrigid ui --model mini",
        formatter_class=HelpFormatter,
    )
    add_model_flags(p)
    add_runtime_flags(p)
    p.add_argument("--out", type=Path, default=Path("nonrigid-ui"),
                   help="folder for every edit made in the page (and for uploads while the server runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 makes the page reachable from other machines (anyone who can "
                   "reach it can run jobs on your machine)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="stage cache folder (default: $NONRIGID_CACHE_DIR or the user cache dir)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    add_output_flags(p)
    p.set_defaults(func=run_ui)


def run_ui(args: argparse.Namespace) -> int:
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")
    check_model_name(args.model)  # a mistyped name, told before torch is imported
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web page needs Gradio: pip install 'nonrigid[ui]'") from None
    # Gradio's upload cache inside the output folder: the page serves nothing from anywhere else
    os.environ.setdefault("GRADIO_TEMP_DIR", str((args.out / ".uploads").resolve()))
    from ..ui.app import launch
    from ..ui.session import Editor, ModelOptions

    quiet_libraries(args.quiet)
    options = ModelOptions(device=args.device, dtype=args.dtype, low_memory=args.low_memory, compile=args.compile,
                           cuda_graphs=args.cuda_graphs,
                           allow_pickle=args.allow_pickle, config=args.config, t5=not args.no_t5)
    editor = Editor(args.model, args.out, options, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    say(args, f"loading model {args.model}")
    editor.load()
    say(args, f"edits are written to {editor.out}")
    if not args.share:
        say(args, "no public link; --share also makes a gradio.live one")
    launch(editor, host=args.host, port=args.port, share=args.share, quiet=args.quiet)
    return 0
