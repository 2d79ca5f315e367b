"""The package's shape: layers that point one way, no import circles, small modules, flags only in the CLI, and
stages that reach the network only through the model-family seam.

Layers (higher may import lower, never the reverse): ``cli``, ``ui`` and ``api`` (the Python API's front door) 5;
``methods``, ``evaluation`` and ``mini`` 4
(``mini`` may import the other two, they may not import it, and ``methods`` may not import ``evaluation``);
``stages`` 2; ``models`` 1; the shared helpers ``errors``, ``images``, ``timing``, ``progress`` and the package
``__init__`` 0.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch
from conftest import ROOT

from nonrigid import invert, optimize_text, sample
from nonrigid.models.sd import StableDiffusion

PACKAGE = ROOT / "src" / "nonrigid"
MAX_LINES = 500  # issue 26: no source file over 500 lines

LAYERS = {"cli": 5, "ui": 5, "api": 5, "methods": 4, "evaluation": 4, "mini": 4, "stages": 2, "models": 1,
          "errors": 0, "images": 0, "timing": 0, "progress": 0}
# same-layer imports that are still forbidden: (importer group, imported group)
FORBIDDEN_WITHIN = {("methods", "mini"), ("evaluation", "mini"), ("methods", "evaluation")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group(module: str) -> str:
    """The top-level part of ``nonrigid.<group>...`` ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    g = group(module)
    if g == "":
        return 0
    if g not in LAYERS:
        raise AssertionError(f"{module} belongs to no layer; add {g!r} to LAYERS in {Path(__file__).name}")
    return LAYERS[g]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The nonrigid modules one import statement names (a ``from pkg import sub`` names pkg.sub if it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "nonrigid"]
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        if node.module:
            base = [*base, *node.module.split(".")]
        source = ".".join(base)
    else:
        source = node.module or ""
    if source.split(".")[0] != "nonrigid":
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]


def imports(module: str) -> list[tuple[str, bool]]:
    """Every (imported nonrigid module, at module level) of ``module``. Module level: run on import (class bodies
    included; function bodies and ``if TYPE_CHECKING:`` blocks excluded)."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, top) for t in _targets(module, child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), top)
            else:
                visit(child, top)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), True)
    return found


def edge_allowed(importer: str, imported: str) -> bool:
    a, b = group(importer), group(imported)
    if a == "cli":
        return True
    if (a, b) in FORBIDDEN_WITHIN:
        return False
    return layer(imported) <= layer(importer)


def test_the_scan_sees_the_package_and_its_imports():
    """Guards the checks below against passing vacuously (a wrong root, a resolver that finds nothing)."""
    assert {"nonrigid.cli.main", "nonrigid.stages.inversion", "nonrigid.models.sd", "nonrigid.mini.world"} <= set(
        MODULES)
    inversion = imports("nonrigid.stages.inversion")
    assert ("nonrigid.models.family", True) in inversion and ("nonrigid.stages", True) in inversion
    assert not edge_allowed("nonrigid.stages.sampling", "nonrigid.methods.ours")
    assert not edge_allowed("nonrigid.methods.run", "nonrigid.evaluation.plan")
    assert not edge_allowed("nonrigid.evaluation.bench", "nonrigid.mini.world")
    assert edge_allowed("nonrigid.mini.train", "nonrigid.evaluation.plan")
    assert not edge_allowed("nonrigid.images", "nonrigid.models.sd")


def test_layers_point_one_way():
    offending = sorted(
        f"{importer} -> {imported}{'' if top else ' (inside a function)'}"
        for importer in MODULES
        for imported, top in imports(importer)
        if not edge_allowed(importer, imported)
    )
    assert not offending, "imports against the layering:\n  " + "\n  ".join(offending)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its first node repeated at the end), or None if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None  # a diamond is no circle
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": ["y"], "y": ["y"]}) == ["y", "y"]


def test_no_import_circles():
    """No circle, counting the imports inside functions too: a circle closed at call time is a circle."""
    graph = {m: sorted({t for t, _ in imports(m) if t != m and t in MODULES}) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_test_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A function-level import that closes a circle (as ``methods/run.py`` loading ``ours`` while ``ours``
    imported from ``run`` once did) is found."""
    a = tmp_path / "nonrigid" / "stages" / "a.py"
    a.parent.mkdir(parents=True)
    a.write_text("def f():\n    from .b import g\n    return g\n")
    (a.parent / "b.py").write_text("from .a import f\n")
    (a.parent / "__init__.py").write_text("")
    monkeypatch.setattr(__import__(__name__), "MODULES", {
        "nonrigid.stages": a.parent / "__init__.py", "nonrigid.stages.a": a, "nonrigid.stages.b": a.parent / "b.py"})
    graph = {m: sorted({t for t, _ in imports(m) if t != m and t in MODULES}) for m in MODULES}
    assert find_cycle(graph) in (["nonrigid.stages.a", "nonrigid.stages.b", "nonrigid.stages.a"],
                                 ["nonrigid.stages.b", "nonrigid.stages.a", "nonrigid.stages.b"])


def test_no_module_is_too_long():
    lengths = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    too_long = sorted(f"{m}: {n} lines" for m, n in lengths.items() if n > MAX_LINES)
    assert not too_long, f"modules over {MAX_LINES} lines:\n  " + "\n  ".join(too_long)


FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*(?=[\s'\"`]|$)")


def flag_mentions(path: Path) -> list[str]:
    """``--flag`` in the string literals of ``path`` (docstrings excepted; comments are no literals)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {match.group()}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        and "nonrigid " not in node.value  # a whole command shown to the user
        for match in FLAG.finditer(node.value)
    ]


def test_the_flag_pattern_finds_flags_and_only_flags():
    for text in ("use --size 512", "choose another --out", "'--allow-pickle'", "--batch-size 4", '"--eta"',
                 "--seed\n", "a --inject", "--device cpu", "--steps"):
        assert FLAG.search(text), text
    for text in ("x--size 3", "--size=3", "a -- b", "---", "pre-steps", "--", "—-size"):
        assert not FLAG.search(text), text


# Where a flag outside cli/ is right: a whole command shown to the user ("train it with `nonrigid mini train
# --install`", the regenerate command of MINIATURE.md) names the flags of another call, not of this one; and
# plan_settings parses the --sweep/--set grammar itself (its tests call it with those strings).
EXEMPT_FILES = ("evaluation/plan.py",)


def test_only_the_cli_speaks_of_flags():
    offending = [hit for p in sorted(PACKAGE.rglob("*.py")) if "cli" not in p.relative_to(PACKAGE).parts
                 and str(p.relative_to(PACKAGE)) not in EXEMPT_FILES for hit in flag_mentions(p)]
    assert not offending, "command-line flags outside cli/:\n  " + "\n  ".join(offending)


class CountingFamily(StableDiffusion):
    """SD 1.x, counting every prediction and the rows it predicts."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.calls = 0
        self.rows = 0
        self.inside = False

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0):
        self.calls += 1
        self.rows += latents.shape[0]
        self.inside = True
        try:
            return super().predict(latents, timestep, cond, uncond, guidance_scale)
        finally:
            self.inside = False


def test_stages_reach_the_unet_only_through_the_family(tiny_pipe, dog_image):
    family = CountingFamily(tiny_pipe)
    forwards = {"all": 0, "inside": 0, "rows": 0}

    def hook(module, args, kwargs, output):
        forwards["all"] += 1
        forwards["inside"] += family.inside
        forwards["rows"] += args[0].shape[0]

    def stages(pipe):
        text = optimize_text(pipe, dog_image, "a photo of a jumping dog", steps=2)
        inversion = invert(pipe, dog_image, "", "nti", 3, 7.5, 2)
        latents = sample(pipe, inversion, text, [0.0, 1.0], [1], output_type="latent")
        return text, inversion, latents

    handle = tiny_pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        through_family = stages(family)
        seen = dict(forwards)
        direct = stages(tiny_pipe)
    finally:
        handle.remove()

    assert family.calls > 0 and seen["all"] > 0
    assert seen["all"] == seen["inside"] == family.calls, (seen, family.calls)  # no forward outside predict
    assert seen["rows"] >= family.rows  # guided predictions run both halves in one forward
    assert forwards["all"] == 2 * seen["all"]  # the pipe itself takes the same path through the family

    (text_a, inv_a, lat_a), (text_b, inv_b, lat_b) = through_family, direct
    assert same(text_a.optimized, text_b.optimized) and text_a.losses == text_b.losses
    assert torch.equal(inv_a.trajectory, inv_b.trajectory) and torch.equal(inv_a.latent, inv_b.latent)
    assert same(inv_a.nulls, inv_b.nulls) and torch.equal(inv_a.reconstruction, inv_b.reconstruction)
    assert inv_a.losses == inv_b.losses
    assert torch.equal(lat_a, lat_b)


def same(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


# The README's API with the signatures it had before the restructuring (issue 12: add, don't break).
PUBLIC_API = {
    "load_pipeline": ["model", "device", "dtype", "allow_pickle", "config", "t5"],
    "load_image": ["image", "size", "crop", "multiple"],  # crop and multiple added (issue 28)
    "optimize_text": ["pipe", "image", "target_prompt", "steps", "lr", "seed", "progress"],
    "optimize_text_batch": ["pipe", "image", "target_prompt", "steps", "lr", "seeds", "progress"],
    "invert": ["pipe", "image", "source_prompt", "method", "num_steps", "guidance_scale", "inner_steps",
               "early_stop", "progress"],
    "sample": ["pipe", "inversion", "text_optimization", "etas", "inject_steps", "output_type", "batch_size",
               "use_reconstruction", "progress"],
    "edit": ["pipe", "image", "target_prompt", "size", "cache", "progress", "settings"],
    "StageCache": ["root"],
}


def test_the_public_api_keeps_its_names_and_signatures():
    import inspect

    import nonrigid

    for name, parameters in PUBLIC_API.items():
        assert list(inspect.signature(getattr(nonrigid, name)).parameters) == parameters, name
    assert set(PUBLIC_API) <= set(nonrigid.__all__)
