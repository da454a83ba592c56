"""The package's layers (docs/architecture.md): mm/ is the memory model and imports
nothing from migrate/, engines/ or bench/; uapi.py imports nothing from the package; and
the packages import one another without a cycle, except through the documented top
(machine.py, __init__.py, plugins.py), which wires the layers together. Imports inside
functions count: a lazy import is still a dependency."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "copyengine"
TOP = {"copyengine", "copyengine.machine", "copyengine.plugins"}


def _module_name(path):
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """(importer, imported module, line) for every import in src/copyengine."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        mod = _module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(mod, a.name, f"{path.relative_to(SRC.parent)}:{node.lineno}") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
                out.append((mod, names, f"{path.relative_to(SRC.parent)}:{node.lineno}"))
    return out


def _targets(t):
    return t if isinstance(t, list) else [t]


def _package(mod):
    """copyengine.mm.process -> copyengine.mm; copyengine.machine -> copyengine.machine."""
    parts = mod.split(".")
    if len(parts) > 2 and (SRC / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) > 1 else mod


def _first_existing(names):
    """The module an ``from X import a`` reaches: X.a when that is a module, else X."""
    for n in reversed(names):
        rel = pathlib.Path(*n.split(".")[1:]) if "." in n else None
        if rel is not None and ((SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()):
            return n
    return names[0]


def test_mm_imports_nothing_above_it():
    bad = []
    for mod, target, where in _imports():
        if not mod.startswith("copyengine.mm"):
            continue
        for t in _targets(target):
            if t.split(".")[:2] in (["copyengine", "migrate"], ["copyengine", "engines"], ["copyengine", "bench"]):
                bad.append(f"{where}: {mod} imports {t}")
    assert not bad, "mm/ must not import migrate/, engines/ or bench/:\n" + "\n".join(sorted(set(bad)))


def test_uapi_is_the_bottom():
    bad = [f"{w}: {t}" for mod, target, w in _imports() if mod == "copyengine.uapi"
           for t in _targets(target) if t.startswith("copyengine")]
    assert not bad, "uapi.py imports from the package:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages_below_the_top():
    edges = {}
    for mod, target, where in _imports():
        src = _package(mod)
        if src in TOP:
            continue
        dst = _first_existing(_targets(target))
        if not dst.startswith("copyengine."):
            continue
        dst = _package(dst)
        if dst == src or dst in TOP:
            if dst in TOP and src not in TOP:
                edges.setdefault(src, {}).setdefault(dst, where)
            continue
        edges.setdefault(src, {}).setdefault(dst, where)
    cycle = find_cycle(edges)
    if cycle:
        pytest.fail("import cycle between packages: " + " -> ".join(cycle) + "\n"
                    + "\n".join(f"  {a} -> {b}: {edges[a][b]}" for a, b in zip(cycle, cycle[1:])))


def find_cycle(edges):
    """A cycle in ``edges`` ({node: {node: where}}) as a closed list of nodes, or None;
    the top's modules end a path (they may import anything)."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in edges.get(n, {}):
            if d in TOP:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in list(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_ignores_the_top():
    """The checker can fail: mm -> migrate -> mm is a cycle; anything through machine is not."""
    assert find_cycle({"copyengine.mm": {"copyengine.migrate": "x"},
                       "copyengine.migrate": {"copyengine.mm": "y"}}) == [
        "copyengine.mm", "copyengine.migrate", "copyengine.mm"]
    assert find_cycle({"copyengine.mm": {"copyengine.machine": "x"},
                       "copyengine.migrate": {"copyengine.mm": "y"}}) is None


def test_the_checker_sees_an_import_inside_a_function():
    """The parser walks function bodies: a lazy import is found (so the checks above can fail)."""
    found = [(m, t) for m, t, _ in _imports() if m == "copyengine.machine"
             and any(x.startswith("copyengine.engines.base") for x in _targets(t))]
    assert found, "the lazy `from .engines.base import create_engine` in Machine was not seen"
