"""docs/ARCHITECTURE.md tells the truth: its generated tables are what the code says today, and every file and every
function, class or attribute its prose names exists."""

from __future__ import annotations

import ast
import re
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import architecture

DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE = ROOT / "src" / "nonrigid"
SPAN = re.compile(r"`([^`\n]+)`")
FILE = re.compile(r"^[\w./-]+(\.py|\.md|\.json|/)$")
MATH = {"tau", "sqrt", "D", "E", "abar"}  # the equations' notation (tau: the text encoder, D and E: the VAE)
NAME = re.compile(r"^([A-Za-z_][\w.]*)(\(|$)")


def defined_names() -> set[str]:
    """Every name the package defines or imports: modules, functions, classes, methods, attributes, fields."""
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                names |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.ImportFrom):
                names |= {alias.asname or alias.name for alias in node.names}
    return names


def prose() -> str:
    """The page without its generated blocks and code sketches (those name flags and data, not code)."""
    text = re.sub(r"<!-- generated:(\w+):start -->.*?<!-- generated:\1:end -->", "", DOC.read_text(), flags=re.S)
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_the_generated_tables_are_current():
    assert architecture.main(["--check"]) == 0, "run: python docs/architecture.py"


def test_every_file_the_page_names_exists():
    roots = (ROOT, ROOT / "src" / "nonrigid", ROOT / "tests", ROOT / "docs", ROOT / "benchmarks")
    files = [span for span in SPAN.findall(prose()) if FILE.match(span)]
    assert files, "the check found no file names: the pattern is broken"
    missing = [f for f in files if not any((root / f).exists() for root in roots) and f != "model_index.json"]
    assert not missing, f"named in ARCHITECTURE.md but not in the repository: {missing}"


def test_every_function_class_and_attribute_the_page_names_exists():
    names = defined_names()
    named = []
    for span in SPAN.findall(prose()):
        match = NAME.match(span)
        if match is None or FILE.match(span) or "=" in span or " " in span.split("(")[0]:
            continue
        named += [part for part in match.group(1).split(".") if part]
    assert len(named) > 50, "the check found too few names: the pattern is broken"
    known_words = {"nonrigid", "tokens", "pooled", "unet", "transformer", "none", "ours"}  # data, not code
    missing = sorted({n for n in named if n not in names | known_words | MATH and not n.startswith("tiny")
                      and not n.endswith("Pipeline") and n not in ("v1", "v2", "xl_base", "sd3", "sd35_medium",
                                                                    "sd35_large", "epsilon", "flow", "v")})
    assert not missing, f"named in ARCHITECTURE.md but defined nowhere in src/nonrigid: {missing}"


def test_the_name_check_has_teeth():
    assert "run_edits" in defined_names() and "text_stage" not in defined_names()
