"""Marked blocks in a Markdown file that a benchmark script rewrites with what it measured.

A block is everything between ``<!-- KEY:start -->`` and ``<!-- KEY:end -->``; the markers stay, so the next run
finds the block again. ``bench_edit.py`` keeps its rows in ``docs/PERFORMANCE.md`` this way, ``readme_figures.py``
the README's figures.
"""

from __future__ import annotations


def replace_block(text: str, key: str, block: str) -> str:
    """``text`` with the block ``key`` replaced by ``block`` (appended at the end, markers and all, if absent)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    return text.rstrip() + f"\n\n{start}\n{block}\n{end}\n"
