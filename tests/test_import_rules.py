"""The import rules of serving/ and moa/, read from the code's own `import` statements (no engines start).

An edge is any `import x` / `from x import y` in a module, at module level or inside a function
(`if TYPE_CHECKING:` blocks are exempt: they never run). The rules:
  1. no import circle among serving/ and moa/ modules;
  2. moa/ imports nothing from serving/ (the orchestrator knows engines only as `moa.engine.Engine`);
  3. layers import only downwards (LAYERS; a module may import its own layer and the ones below):
       0  moa
       1  serving.sandbox, serving.routing           (self-contained: the code sandbox, query routers)
       2  serving.models, serving.placement          (what a model is; where engines run: no engine code)
       3  serving.engines                            (start engines, apply the plan, check their answers)
       4  serving.bench, serving.api                 (benchmarks; the HTTP server: neither imports the other)
       5  serving.cli                                (the `moa` command: may import anything)
     plus FORBIDDEN: the machine facts, the pure device plan, the placement check and the sandbox import
     nothing from serving/; serving.models reads from serving.placement only the machine facts (the plan
     reads the models, never the reverse).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moa", "serving")

# The longest matching prefix decides a module's layer.
LAYERS: dict[str, int] = {
    "moa": 0,
    "serving": 1,  # serving/__init__.py only: every other module is below a longer prefix
    "serving.sandbox": 1,
    "serving.routing": 1,
    "serving.models": 2,
    "serving.placement": 2,
    "serving.engines": 3,
    "serving.bench": 4,
    "serving.api": 4,
    "serving.cli": 5,
}
# importer prefix -> prefixes it must not import even where the layers allow it (longest importer prefix wins).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "serving.sandbox": ("serving",),
    "serving.placement.machine": ("serving",),
    "serving.placement.devices": ("serving",),
    "serving.placement.check": ("serving",),
    "serving.models": ("serving.placement.plan", "serving.placement.devices", "serving.placement.check"),
    "serving.bench": ("serving.api",),
    "serving.api": ("serving.bench",),
}
# The one module that may sit directly in serving/: everything else belongs to a package.
LOOSE_OK = ("serving.sandbox",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules) -> list[str]:
    """Every module named by an import in `tree`, TYPE_CHECKING blocks left out.

    `from pkg import sub` names the submodule pkg.sub when there is one (not pkg's __init__, which
    Python runs first for every import under pkg anyway), else pkg itself.
    """
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(sub if sub in modules else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the serving/moa modules it imports (by name, resolved to existing modules)."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for target in _imports(tree, name, path.name == "__init__.py", modules):
            if target in modules and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component, e.g. [a, b, c, a]."""
    start = min(component)
    path, seen = [start], {start}
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    node, path = v, [start]
                    while node != start:
                        path.append(node)
                        node = parents[node]
                    return [start] + path[1:][::-1] + [start]
                if w not in seen:
                    seen.add(w)
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def _prefix_value(table: dict, module: str):
    best = None
    for prefix in table:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        src_layer = LAYERS[_prefix_value(LAYERS, src)]
        forbidden_key = _prefix_value(FORBIDDEN, src)
        for dst in sorted(targets):
            dst_layer = LAYERS[_prefix_value(LAYERS, dst)]
            if dst_layer > src_layer:
                bad.append(f"{src} -> {dst} (layer {src_layer} imports upward into layer {dst_layer})")
            elif forbidden_key and _prefix_value({p: 0 for p in FORBIDDEN[forbidden_key]}, dst):
                bad.append(f"{src} -> {dst} ({forbidden_key} must not import it)")
    return bad


def test_every_module_has_a_layer():
    unplaced = [m for m in all_modules() if _prefix_value(LAYERS, m) is None]
    assert not unplaced, f"modules outside LAYERS: {unplaced}"
    loose = [m for m in all_modules() if m.count(".") == 1 and m.startswith("serving.")
             and (ROOT / "serving" / f"{m.split('.')[1]}.py").exists() and m not in LOOSE_OK]
    assert not loose, f"loose modules directly under serving/ (put them in a package): {loose}"


def test_no_import_circles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_moa_imports_nothing_from_serving():
    graph = import_graph()
    bad = [f"{src} -> {dst}" for src, targets in sorted(graph.items()) if src.split(".")[0] == "moa"
           for dst in sorted(targets) if dst.split(".")[0] == "serving"]
    assert not bad, "moa/ imports serving/:\n" + "\n".join(bad)


def test_layers_import_only_downwards():
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


if __name__ == "__main__":  # print the graph's problems without pytest
    g = import_graph()
    for c in find_cycles(g):
        print("CYCLE", " -> ".join(c))
    for line in layer_violations(g):
        print("LAYER", line)
