"""The packages' imports point one way: stages/common <- rewards <- the stages <- pipeline, cli, registry.
Every import counts, also those inside functions: an AST walk of every module, then no upward import, no
stage importing another stage, and no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = [  # lowest first: a module may import modules of its own layer and of the layers below
    ["stages.common", "stages"],  # "stages" is the package's own __init__ (log filters, no imports)
    ["rewards"],
    ["stages.sft", "stages.rm", "stages.ppo", "stages.dpo", "stages.eval", "stages.demo"],
    ["stages.pipeline", "stages.cli", "stages.registry"],
]
STAGE_LAYER = 2


def layer_of(module: str) -> tuple[int, str]:
    """(layer, the package of the layer's list that holds the module), by the longest matching prefix."""
    best = (-1, "")
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (level, prefix)
    if best[0] < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def module_sources(root: Path) -> dict[str, tuple[str, bool]]:
    """module name -> (source text, is a package __init__)."""
    found = {}
    for package in ("stages", "rewards"):
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path.read_text(encoding="utf-8"), is_package)
    return found


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (resolved to the deepest existing module)."""
    def resolve(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (text, is_package) in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:  # `from package import submodule` imports the submodule
                    targets.add(resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in sources else resolve(base))
        graph[module] = {t for t in targets if t and t != module}
    return graph


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        level, package = layer_of(module)
        for target in sorted(targets):
            target_level, target_package = layer_of(target)
            if target_level > level:
                problems.append(f"{module} imports {target} from a higher layer")
            elif level == target_level == STAGE_LAYER and package != target_package:
                problems.append(f"{module} imports {target}: a stage never imports another stage (move what they share down)")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_an_upward_import_a_cross_stage_import_and_a_cycle():
    sources = {
        "stages.common.a": ("from stages.ppo import train\n", False),  # upward
        "stages.ppo.train": ("def f():\n    from stages.eval import compare\n", False),  # another stage, inside a function
        "stages.eval.compare": ("", False),
        "rewards.x": ("from . import y\n", False),  # a cycle x <-> y
        "rewards.y": ("import rewards.x\n", False),
        "rewards": ("", True),
    }
    graph = import_graph(sources)
    problems = layering_problems(graph)
    assert any("stages.common.a imports stages.ppo.train from a higher layer" in p for p in problems)
    assert any("stages.ppo.train imports stages.eval.compare" in p for p in problems)
    assert import_cycles(graph) == [["rewards.x", "rewards.y"]]


def test_imports_point_one_way_and_form_no_cycle():
    graph = import_graph(module_sources(ROOT))
    assert len(graph) > 40  # really read the tree
    assert layering_problems(graph) == []
    assert import_cycles(graph) == []


def test_no_module_in_stages_or_rewards_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for package in ("stages", "rewards") for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}
