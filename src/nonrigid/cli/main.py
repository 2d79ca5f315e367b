"""The ``nonrigid`` command: subcommands over the library's API.

Exit codes: 0 success, 2 bad usage (a bad flag, a missing or unreadable input, a model that cannot be found), 1 a
failure while running (e.g. NaN in a stage), 130 interrupted. Errors are one line on stderr; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import NonrigidError
from .bench import add_bench_parsers
from .common import HelpFormatter, Parser, configure_logging, for_the_command_line
from .edit import add_edit_parser
from .mini import add_mini_parser
from .ui import add_ui_parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nonrigid",
        description="Training-free non-rigid image editing with Stable Diffusion: change a subject's pose or "
        "action while its identity and background stay (text optimization, latent inversion, timestep-aware "
        "text injection sampling).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nonrigid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_edit_parser(commands)
    add_mini_parser(commands)
    add_bench_parsers(commands)
    add_ui_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except NonrigidError as err:
        if args.debug:
            raise
        print(f"nonrigid: error: {for_the_command_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("nonrigid: interrupted; finished stages stay in the cache", file=sys.stderr)
        return 130


