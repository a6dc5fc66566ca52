"""The package's layers only point down, and its parts import each other without cycles.

Every ``import deephash.X`` / ``from deephash.X import`` in ``src/deephash`` (function-level ones
too) is read with ``ast``; each module belongs to a top-level part (``runs``, ``train``,
``config``, ...) and each part to a layer. A module may import its own part, parts of lower
layers, and parts of its own layer as long as the part graph stays acyclic.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "deephash"

#: Layer of each top-level part of the package (ARCHITECTURE.md, with config one layer up: its
#: validation reads the registries of the data, model, loss and optimizer parts).
LAYERS: dict[str, int] = {
    "errors": 0, "_io": 0, "registry": 0, "_version": 0, "devices": 0, "signs": 0, "export_format": 0, "_tensors": 0,
    "_lazy": 0,
    "distances": 1, "data": 1, "models": 1, "mining": 1, "losses": 1,
    "config": 2, "train": 2, "retrieval": 2,
    "runs": 3,
    "cli": 4, "serve": 4, "report": 4, "viz": 4, "__main__": 4,
}
#: The package's ``__init__`` re-exports the public API from every layer.
EXEMPT = {"__init__"}


def part_of(module: str) -> str:
    """``deephash.runs.training`` -> ``runs``; ``deephash`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, int]]:
    """``(imported deephash module, line)`` for every import statement in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "deephash"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "deephash":
            if node.module == "deephash":  # from deephash import runs / __version__
                found += [(f"deephash.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def edges(package: Path = PACKAGE) -> list[tuple[str, str, str, int]]:
    """``(source part, target part, file, line)`` for every import between two parts."""
    result = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        source = part_of(module)
        for target_module, line in imports_of(path):
            target = part_of(target_module)
            if target != source:
                result.append((source, target, path.relative_to(package).as_posix(), line))
    return result


def violations(found: list[tuple[str, str, str, int]]) -> list[str]:
    """Upward imports, imports of unknown parts, and cycles between parts."""
    problems = []
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target, where, line in found:
        if source in EXEMPT:
            continue
        if source not in LAYERS or target not in LAYERS:
            problems.append(f"{where}:{line}: {source} -> {target}: a part with no layer (add it to LAYERS)")
            continue
        if LAYERS[target] > LAYERS[source]:
            problems.append(f"{where}:{line}: {source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})")
        graph[source].add(target)
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of parts (a depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_layers_only_point_down_and_parts_have_no_cycles():
    problems = violations(edges())
    assert not problems, "\n".join(problems)


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts - EXEMPT <= set(LAYERS), sorted(parts - EXEMPT - set(LAYERS))


@pytest.mark.parametrize("source, target, expected", [
    ("models", "runs", "layer 1) imports runs (layer 3"),  # upward
    ("train", "cli", "layer 2) imports cli (layer 4"),
])
def test_an_upward_import_is_reported(source, target, expected):
    assert any(expected in p for p in violations([(source, target, f"{source}/x.py", 1)]))


def test_a_cycle_within_a_layer_is_reported():
    problems = violations([("data", "models", "data/x.py", 1), ("models", "data", "models/y.py", 2)])
    assert any(p.startswith("import cycle: data -> models -> data") for p in problems)


def test_the_checker_reads_function_level_imports(tmp_path):
    package = tmp_path / "deephash"
    (package / "models").mkdir(parents=True)
    (package / "models" / "__init__.py").write_text("def f():\n    from deephash.runs import train_run\n")
    (package / "runs").mkdir()
    (package / "runs" / "__init__.py").write_text("")
    assert violations(edges(package)) == ["models/__init__.py:2: models (layer 1) imports runs (layer 3)"]


# ------------------------------------------------------------------ the server of an exported model

#: What a server on an exported model (``deephash serve INDEX --model DIR``) imports first
#: (ARCHITECTURE.md: it sits in serve/ and must not import torch).
TORCH_FREE_ROOTS = ("deephash.__main__", "deephash.cli", "deephash.serve.cli", "deephash.serve.app",
                    "deephash.serve.onnx_encoder")


def module_file(module: str, package: Path = PACKAGE) -> Path | None:
    """The file of ``deephash.a.b`` (a module or a package's ``__init__``); None when it is not a module."""
    base = package.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def load_time_imports(path: Path) -> list[str]:
    """Modules a file imports when it is loaded: its top-level statements (also inside top-level
    ``if``/``try`` blocks, but not under ``if TYPE_CHECKING``), not those inside functions or classes.
    ``from deephash.x import y`` yields ``deephash.x`` and ``deephash.x.y`` (y may be a module)."""
    found: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append(node.module)
                found.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if ast.unparse(node.test) not in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def torch_imports_at_load(roots: tuple[str, ...] = TORCH_FREE_ROOTS, package: Path = PACKAGE) -> list[str]:
    """``"module imports torch (via a <- b <- root)"`` for every deephash module loaded with ``roots``
    (and the packages above each) whose top level imports torch."""
    chain: dict[str, str | None] = {}
    todo = [(root, None) for root in roots]
    while todo:
        module, parent = todo.pop()
        if module in chain or module_file(module, package) is None:
            continue
        chain[module] = parent
        parts = module.split(".")
        todo += [(".".join(parts[:i]), module) for i in range(1, len(parts))]  # the packages above run first
        todo += [(name, module) for name in load_time_imports(module_file(module, package))
                 if name.split(".")[0] == "deephash"]
    problems = []
    for module in sorted(chain):
        if any(name.split(".")[0] == "torch" for name in load_time_imports(module_file(module, package))):
            path, step = [module], chain[module]
            while step is not None:
                path.append(step)
                step = chain[step]
            problems.append(f"{module} imports torch (via {' <- '.join(path)})")
    return problems


def test_the_server_of_an_exported_model_never_imports_torch():
    assert torch_imports_at_load() == []


def test_a_torch_import_on_the_serving_path_is_reported(tmp_path):
    package = tmp_path / "deephash"
    (package / "serve").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "serve" / "__init__.py").write_text("from deephash.serve.app import create_app\n")
    (package / "serve" / "app.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    import torch\n"
                                              "def f():\n    import torch\nfrom deephash import tools\n")
    (package / "tools.py").write_text("try:\n    import torch.nn\nexcept ImportError:\n    pass\n")
    assert torch_imports_at_load(("deephash.serve.app",), package) == [
        "deephash.tools imports torch (via deephash.tools <- deephash.serve.app)"]
