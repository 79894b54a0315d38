"""No import cycle among the modules of the packages ``bptt`` and ``bptt_kernels`` (the folder
kernels/). Every ``import`` and ``from ... import`` counts, at module level or inside a
function; relative imports are resolved; ``from pkg import name`` is an import of the module
``pkg.name`` where that is a module, else of ``pkg``. A package's ``__init__`` is not counted
as imported by its submodules (that edge is in every package and harmless)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bptt": ROOT / "bptt", "bptt_kernels": ROOT / "kernels"}


def module_files(packages=PACKAGES):
    """{dotted module name: path} of every .py file under the packages' folders."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(Path(folder).rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _known_prefix(dotted, known):
    """The longest prefix of ``dotted`` that is a known module, or None."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in known:
            return name
    return None


def imports_of(name, path, known):
    """The known modules that the module ``name`` (file ``path``) imports anywhere in its body."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    package = name if Path(path).name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_known_prefix(alias.name, known) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else _known_prefix(base, known))
        else:
            continue
        found.update(t for t in targets if t is not None and t != name)
    return found


def import_graph(packages=PACKAGES):
    """{module: set of modules it imports} over the packages."""
    modules = module_files(packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph):
    """One cycle [m0, m1, ..., m0] per strongly connected component of more than one module
    (Tarjan's algorithm, iterative); [] when the graph has no cycle."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.add(m)
                    if m == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_through(graph, min(c), c) for c in components]


def _cycle_through(graph, start, component):
    """A shortest path start -> ... -> start inside ``component`` (breadth first)."""
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = []
                    while node is not None:
                        path.append(node)
                        node = previous[node]
                    return path[::-1] + [start]
                if child in component and child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def describe(cycles):
    return "; ".join(" -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------------
# the finder itself


def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    cycles = find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": {"e"}})
    assert sorted(describe([c]) for c in cycles) == ["a -> b -> c -> a", "e -> f -> e"]
    (cycle,) = find_cycles({"x": {"y", "z"}, "y": {"x"}, "z": {"y"}})
    assert cycle == ["x", "y", "x"]                       # the shortest cycle through x


def test_graph_counts_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..a import f\n")
    (pkg / "c.py").write_text("import pkg.sub.b as b\nfrom pkg import sub\n")
    graph = import_graph({"pkg": pkg})
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.a"}, "pkg.c": {"pkg.sub.b", "pkg.sub"}}
    assert describe(find_cycles(graph)) == "pkg.a -> pkg.sub.b -> pkg.a"


# ------------------------------------------------------------------------------------------
# the packages


def test_the_graph_covers_both_packages():
    graph = import_graph()
    assert {"bptt", "bptt.trainer", "bptt.checkpoint", "bptt_kernels", "bptt_kernels.reference"} <= set(graph)
    assert "bptt.models" in graph["bptt.trainer"]


def test_no_import_cycle_through_bptt():
    cycles = [c for c in find_cycles(import_graph()) if any(m.split(".")[0] == "bptt" for m in c)]
    assert not cycles, f"import cycles: {describe(cycles)}"


def test_no_import_cycle_in_bptt_kernels():
    cycles = [c for c in find_cycles(import_graph()) if all(m.split(".")[0] == "bptt_kernels" for m in c)]
    assert not cycles, f"import cycles: {describe(cycles)}"
