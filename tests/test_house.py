"""The shape of the house: no import cycles, one definition per concept, evaluation independent of training's
internals. These are the properties a redesign established (issue "one home per concept"); they fail when a
later change quietly breaks them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "analytic_dpm"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (top-level and inside functions alike)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and not name.startswith(t + ".") and t.startswith("analytic_dpm"):
                    out.add(t)
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _imports()
    # a package's __init__ re-exporting its modules is not a cycle of concepts: leave package -> submodule edges out
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    graph = {m: {t for t in ts if not (m.startswith(t + ".") or t == m)} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_evaluation_uses_training_only_to_read_checkpoints():
    graph = _imports()
    users = {m: sorted(t for t in ts if t.startswith("analytic_dpm.training")) for m, ts in graph.items()
             if m.startswith("analytic_dpm.evaluation")}
    assert {m: ts for m, ts in users.items() if ts} == {"analytic_dpm.evaluation.sources": ["analytic_dpm.training"]}


def _definitions(name: str) -> list[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append(_module_name(path))
    return found


def test_one_definition_per_concept():
    one_home = {
        "CompileFallbackWarning": "analytic_dpm.accel",
        "parse_flag": "analytic_dpm.accel",
        "plain": "analytic_dpm.registry",
        "safe_torch_load": "analytic_dpm.files",
        "file_sha256": "analytic_dpm.identity",
        "mix_seed": "analytic_dpm.seeding",
        "calibrate_gamma": "analytic_dpm.calibration",
        "plot_gamma": "analytic_dpm.plots",
        "plot_variance_bounds": "analytic_dpm.plots",
        "variance_curves": "analytic_dpm.plots",
        "figure": "analytic_dpm.plots",
        "UserError": "analytic_dpm.errors",
        "run_identity": "analytic_dpm.evaluation.provenance",
        "check_same_run": "analytic_dpm.evaluation.provenance",
    }
    assert {name: _definitions(name) for name in one_home} == {name: [home] for name, home in one_home.items()}
