"""The package layout keeps the data flow one-directional: the core never imports a stage, packages import each
other without cycles, and the demo world stays out of the library the stages run."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "passreid"
CORE = {"config", "dist", "data", "models", "losses", "eval", "cluster", "engine", "seeding", "feature_inputs",
        "atomic_files"}
STAGES = {"pretrain", "finetune", "usl", "uda"}
# UDA is USL with another start, so it builds on the USL stage; every other stage stands on the core alone (the
# re-ID sections, model factory, data sets and model file that fine-tuning and Cluster Contrast share are core).
STAGE_IMPORTS = {("uda", "usl")}


def _top_level(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imports() -> dict[str, set[str]]:
    """Top-level sub-package or module of passreid -> those of passreid it imports (absolute imports)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = _top_level(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "passreid":  # from passreid import dist
                names += [f"passreid.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "passreid" and len(parts) > 1 and parts[1] != source:
                    graph[source].add(parts[1])
    return graph


def test_the_core_never_imports_a_stage_the_demo_or_the_tools():
    graph = _imports()
    assert {"finetune", "pretrain", "engine", "data"} <= set(graph)  # the scan found the package
    wrong = {(core, target) for core in CORE for target in graph.get(core, ())
             if target not in CORE}
    assert not wrong, f"core modules importing outside the core: {sorted(wrong)}"


def test_stages_import_only_the_known_stages_and_never_the_demo_world():
    graph = _imports()
    between_stages = {(stage, target) for stage in STAGES for target in graph.get(stage, ()) if target in STAGES}
    assert between_stages <= STAGE_IMPORTS, sorted(between_stages - STAGE_IMPORTS)
    assert not [source for source, targets in graph.items() if "demo" in targets and source != "demo"]


def test_packages_import_each_other_without_cycles():
    graph = _imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, node, target])
            if target not in state:
                visit(target, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
