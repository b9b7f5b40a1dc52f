"""Imports point down the pipeline (STYLE.md, section 1), function-level imports included.

io/ reads slides and knows nothing of stains; the analyzers see arrays, never readers, the engine
or the outputs; the engine never imports what runs it (batch, grade, cli); the shared parts of the
analyzers (nuclei, fibres, tissue, ...) never import a stain's analyzer, nor one stain's analyzer
another's. ``tests/test_synth.py`` checks that the phantom generator imports nothing but errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "marrowseg"

#: top-level modules and packages of marrowseg, lowest first; a module may import its own layer or lower
LAYERS = (
    ("marrowseg", "errors"),
    ("io", "synth"),  # reading slides and drawing phantoms know nothing of stains or settings
    ("config", "stains"),
    ("tiling", "stain_id", "focus"),
    ("analyzers",),
    ("slide_checks",),  # what a slide must be before the engine analyses it
    ("engine",),
    ("outputs",),
    ("pipeline", "review", "batch_plan"),
    ("report", "batch_slide"),
    ("grade", "batch"),
    ("demo",),
    ("cli",),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
#: the analyzers of one stain each; everything else in analyzers/ is shared by them
STAIN_ANALYZERS = ("he", "ecad", "reticulin")


def _module(py: Path) -> str:
    parts = py.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(py: Path) -> set[str]:
    """Every marrowseg module ``py`` imports (``from marrowseg import x`` counts as ``marrowseg.x``)."""
    out = set()
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "marrowseg"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "marrowseg":
            assert node.level == 0, f"{py}: relative import"
            out |= {f"{node.module}.{a.name}" for a in node.names} if node.module in (
                "marrowseg", "marrowseg.analyzers") else {node.module}
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1].startswith("__"):  # marrowseg itself, marrowseg.__version__
        return "marrowseg"
    return parts[1]


def _graph() -> dict[str, set[str]]:
    return {_module(py): _imports(py) for py in sorted(ROOT.rglob("*.py"))}


def test_every_top_level_module_has_a_layer():
    tops = {_top(m) for m in _graph()}
    assert tops == set(RANK), f"give a layer to {sorted(tops - set(RANK))}; gone: {sorted(set(RANK) - tops)}"


def test_imports_point_down_the_pipeline():
    upward = []
    for mod, deps in _graph().items():
        for dep in deps:
            top = _top(dep)
            if top in RANK and RANK[top] > RANK[_top(mod)]:
                upward.append(f"{mod} imports {dep}")
    assert not upward, "imports against the pipeline:\n" + "\n".join(sorted(upward))


def test_no_import_cycle_between_top_level_modules():
    edges: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        edges.setdefault(_top(mod), set()).update(_top(d) for d in deps if _top(d) in RANK)
    for a, outs in edges.items():
        for b in outs - {a}:
            assert a not in edges.get(b, set()), f"{a} and {b} import each other"


def _analyzer_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "analyzers" else None


@pytest.mark.parametrize("kind", ["shared", "stain"])
def test_shared_analyzer_parts_never_import_a_stains_analyzer(kind):
    bad = []
    for mod, deps in _graph().items():
        part = _analyzer_part(mod)
        if part is None or (part in STAIN_ANALYZERS) != (kind == "stain"):
            continue
        for dep in deps:
            other = _analyzer_part(dep)
            if other in STAIN_ANALYZERS and other != part:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(bad)
