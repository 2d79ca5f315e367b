"""Writes the parts of docs/ARCHITECTURE.md that the code can say itself: the module table and each layer's imports.

    python docs/architecture.py           # rewrite the generated blocks of docs/ARCHITECTURE.md
    python docs/architecture.py --check   # exit 1 if they differ from the code (tests/test_architecture_doc.py)

The prose around the blocks (the layers' rules, the seam, the data flows) is written by hand; a test checks that
every file and function it names exists.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "nonrigid"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
# the layers, top down (a module may import its own layer and the ones below; docs/ARCHITECTURE.md says more)
LAYERS = (("cli", "ui", "api"), ("methods", "evaluation", "mini"), ("stages",), ("models",),
          ("errors", "images", "timing", "progress"))


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def group(module: str) -> str:
    """``nonrigid.methods.ours`` -> ``methods`` ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The nonrigid modules ``module`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nonrigid"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join([*package[: len(package) - (node.level - 1)], *(node.module or "").split(".")])
                base = base.rstrip(".")
            else:
                base = node.module or ""
            if base.split(".")[0] == "nonrigid":
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return found


def summary(path: Path) -> str:
    """The module docstring's first sentence (its first line when the sentence runs on)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?[.:])(\s|$)", text)
    return (match.group(1) if match else text).rstrip(":.")


def public_names(path: Path) -> list[str]:
    """Top-level functions and classes that do not start with an underscore."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)
            and not node.name.startswith("_")]


def module_table() -> str:
    lines = ["| module | what it is | public names |", "| --- | --- | --- |"]
    for path in modules().values():
        relative = path.relative_to(PACKAGE).as_posix()
        names = ", ".join(f"`{n}`" for n in public_names(path)) or "—"
        lines.append(f"| `{relative}` | {summary(path)} | {names} |")
    return "\n".join(lines)


def layer_imports() -> str:
    known = modules()
    uses: dict[str, set[str]] = {}
    for name, path in known.items():
        mine = group(name) or "nonrigid"
        uses.setdefault(mine, set()).update(group(t) or "nonrigid" for t in imported(name, path, known) if t in known)
    lines = ["| layer | folder or module | imports from |", "| --- | --- | --- |"]
    for level, groups in enumerate(LAYERS):
        for g in groups:
            others = sorted(uses.get(g, set()) - {g, "nonrigid"})
            lines.append(f"| {len(LAYERS) - level} | `{g}` | {', '.join(f'`{o}`' for o in others) or '—'} |")
    return "\n".join(lines)


BLOCKS = {"modules": module_table, "imports": layer_imports}


def generated(text: str) -> str:
    """``text`` with every generated block rewritten from the code."""
    for name, make in BLOCKS.items():
        start, end = f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{DOC} lacks the markers of the {name} block")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{make()}\n{end}{after}"
    return text


def main(argv: list[str]) -> int:
    text = DOC.read_text(encoding="utf-8")
    fresh = generated(text)
    if "--check" in argv:
        if fresh != text:
            print(f"{DOC} is out of date: run python docs/architecture.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh, encoding="utf-8")
    print(DOC)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
