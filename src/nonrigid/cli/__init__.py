"""The ``nonrigid`` command line: ``main`` (parser and error handling), ``edit`` (edit, methods), ``bench``
(bench, score, report), ``mini`` (the miniature world), ``common`` (what they share). It calls the library's API
and nothing calls it."""

from .main import main

__all__ = ["main"]
