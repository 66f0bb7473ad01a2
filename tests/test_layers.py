"""The import graph keeps DESIGN.md's layer order and has no circle.

Every module of ldae_fast/, bench/ and train.py is parsed (no import runs); every `import` and
`from ... import` counts, those inside functions included, since a deferred import is still a
dependency. A module imports only from its own layer or below. LAYERS maps each module to its
layer by name prefix, explicitly: a new module outside every prefix fails the test until it is
given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# DESIGN.md's order, lowest first: 1. reference, seeding, errors, batch; 2. kernels, config
# mechanism; 3. tokenizers, data, models; 4. methods; 5. engine; 6. eval; 7. train / CLIs / bench.
# The longest matching prefix decides ("ldae_fast" itself, the package's __init__, matches only
# itself: a module outside every entry has no layer).
LAYERS = {
    "ldae_fast": 1,  # its version string, nothing else
    "ldae_fast.reference": 1,
    "ldae_fast.seeding": 1,
    "ldae_fast.errors": 1,
    "ldae_fast.batch": 1,
    "ldae_fast.markers": 1,  # NVTX phase markers: a leaf that models, methods and engine share
    "ldae_fast.lr_schedule": 1,  # warm-up + cosine, shared by the trainer, the tokenizer fits and eval
    "ldae_fast.device": 1,  # device, autocast, eval mode: shared by engine, methods, eval, bench
    "ldae_fast.tokenizer_kinds": 1,  # the tokenizer names, torch-free: config validates against them
    "ldae_fast.shard_urls": 1,  # shard URL grammar + trust rule, pure strings: config and data read it
    "ldae_fast.lazy": 1,  # PEP 562 lazy exports of the data and eval packages
    "ldae_fast.kernels": 2,
    "ldae_fast.config": 2,
    "ldae_fast.config_registry": 2,  # the name lists, sections and presets the layers above register
    "ldae_fast.tokenizers": 3,
    "ldae_fast.data": 3,
    "ldae_fast.models": 3,
    "ldae_fast.methods": 4,
    "ldae_fast.engine": 5,
    "ldae_fast.eval": 6,
    "ldae_fast.train": 7,
    "ldae_fast.cli": 7,
    "ldae_fast.tokenizer_cli": 7,
    "ldae_fast.__main__": 7,
    "ldae_fast.featlearn": 7,  # the two-layer study behind its own CLI; nothing imports it
    "bench": 7,
    "train": 7,  # the repository's train.py
}

# Circles another change removes; each entry must still be a circle, so the list only shrinks.
KNOWN_CIRCLES: set[frozenset[str]] = set()
# Arrows up another change removes; each must still exist, so the list only shrinks. Circles are
# looked for without them (each closes one through the modules below it).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_files() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    files = [*sorted((ROOT / "ldae_fast").rglob("*.py")), *sorted((ROOT / "bench").glob("*.py")),
             ROOT / "train.py"]
    out = {}
    for f in files:
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _known(name: str, modules) -> str | None:
    """`name`, or the nearest enclosing module we have (an attribute import names its module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (outside packages are left out)."""
    modules = module_files()
    graph = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(_known(a.name, modules) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    deps.add(sub if sub in modules else _known(target, modules))
        deps.discard(None)
        deps.discard(name)
        graph[name] = deps  # type: ignore[assignment]
    return graph


def layer_of(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or (p != "ldae_fast" and module.startswith(p + "."))),
               key=len, default=None)
    return LAYERS[best] if best is not None else None


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_every_module_has_a_layer():
    unmapped = sorted(m for m in module_files() if layer_of(m) is None)
    assert not unmapped, f"give these modules a layer in LAYERS (tests/test_layers.py): {unmapped}"


def test_no_import_from_a_higher_layer():
    graph = import_graph()
    up = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
          for m, deps in sorted(graph.items()) for d in sorted(deps)
          if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)
          and (m, d) not in KNOWN_UPWARD]
    assert not up, "imports against the layer order (DESIGN.md):\n" + "\n".join(up)
    gone = sorted(e for e in KNOWN_UPWARD if e[1] not in graph.get(e[0], set()))
    assert not gone, f"no longer imported: remove them from KNOWN_UPWARD: {gone}"


def test_no_import_circle():
    graph = {m: {d for d in deps if (m, d) not in KNOWN_UPWARD} for m, deps in import_graph().items()}
    found = circles(graph)
    new = [sorted(c) for c in found if c not in KNOWN_CIRCLES]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not gone, f"no longer circles: remove them from KNOWN_CIRCLES: {gone}"


def test_the_checks_see_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The graph reads deferred and relative imports, and the checks catch a circle and an arrow up."""
    pkg = tmp_path / "ldae_fast"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "eval").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "train.py").write_text("")
    for f in (pkg / "__init__.py", pkg / "engine" / "__init__.py", pkg / "eval" / "__init__.py"):
        f.write_text("")
    (pkg / "engine" / "a.py").write_text("def f():\n    from ..eval import b\n")
    (pkg / "eval" / "b.py").write_text("from ldae_fast.engine.a import f\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["ldae_fast.engine.a"] == {"ldae_fast.eval.b"}
    assert graph["ldae_fast.eval.b"] == {"ldae_fast.engine.a"}
    assert circles(graph) == [frozenset({"ldae_fast.engine.a", "ldae_fast.eval.b"})]
    assert layer_of("ldae_fast.engine.a") < layer_of("ldae_fast.eval.b")
    assert layer_of("ldae_fast.nowhere") is None
