"""DESIGN.md's package picture is the import graph: checked from the source, not from memory.

The graph counts every `import` of a kdsearch module, at the top of a file or inside a function (a lazy import is
still a dependency). Units are the top-level modules and packages of kdsearch (`kdsearch.quant`, `kdsearch.fp32`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kdsearch"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def module_graph() -> dict[str, set[str]]:
    """module -> the kdsearch modules it imports (resolving relative imports and `from pkg import module`)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = (".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module or "")
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in module_graph().items():
        out.setdefault(_unit(m), set())
        for d in deps:
            if _unit(d) != _unit(m):
                out[_unit(m)].add(_unit(d))
    out.pop("kdsearch", None)  # the package root (__init__: the version) and its importers are not a layer
    return {k: {d for d in v if d != "kdsearch"} for k, v in out.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def design_graph() -> dict[str, set[str]]:
    """The lines `unit -> dep, dep` of DESIGN.md's "Package graph" block."""
    text = (ROOT / "DESIGN.md").read_text()
    block = text.split("## Package graph", 1)[1].split("```", 2)[1]
    out = {}
    for line in block.splitlines():
        m = re.match(r"^\s*([\w.]+)\s*->\s*(.*)$", line)
        if m:
            deps = {d.strip() for d in m.group(2).split(",") if d.strip() and d.strip() != "(nothing)"}
            out[f"kdsearch.{m.group(1)}"] = {f"kdsearch.{d}" for d in deps}
    return out


def test_no_import_cycles_between_modules_or_packages() -> None:
    assert cycles(module_graph()) == []
    assert cycles(package_graph()) == []


def test_only_the_pipeline_and_the_cli_import_the_stages() -> None:
    offenders = sorted((m, d) for m, deps in module_graph().items() for d in deps
                       if d.startswith("kdsearch.stages") and not m.startswith("kdsearch.stages")
                       and m not in ("kdsearch.pipeline", "kdsearch.cli"))
    assert offenders == []


def test_libraries_never_import_views_or_stages() -> None:
    libs = ("kdsearch.quant", "kdsearch.distill", "kdsearch.sensitivity", "kdsearch.search", "kdsearch.models",
            "kdsearch.data", "kdsearch.train")
    views = {"kdsearch.stages", "kdsearch.pipeline", "kdsearch.cli", "kdsearch.report", "kdsearch.status"}
    graph = package_graph()
    assert {lib: graph[lib] & views for lib in libs if graph[lib] & views} == {}


def test_design_md_package_graph_equals_the_import_graph() -> None:
    actual, written = package_graph(), design_graph()
    missing = {k: sorted(v - written.get(k, set())) for k, v in actual.items() if v - written.get(k, set())}
    extra = {k: sorted(v - actual.get(k, set())) for k, v in written.items() if v - actual.get(k, set())}
    assert set(written) == set(actual), f"units: DESIGN.md lacks {set(actual) - set(written)}, " \
                                        f"has unknown {set(written) - set(actual)}"
    assert not missing and not extra, f"DESIGN.md is missing edges {missing} and lists absent ones {extra}"
