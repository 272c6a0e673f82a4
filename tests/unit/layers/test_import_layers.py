"""The layer table of docs/architecture.md (Layers), read from the document and checked on the
source (AST, no imports run):

- every module of ``hpt_megatron`` belongs to a row of the table;
- a package imports only the packages its ``imports`` cell names (``everything below``: every row
  below it), and those are all below it: imports go one way, top to bottom;
- a ``no X`` in the cell forbids module ``X`` (and its submodules) to the package and to every
  module of ours that it loads, directly or through others: importing a submodule runs the
  ``__init__`` of each package above it, and an import inside a function runs when the function
  does (imports under ``if TYPE_CHECKING:`` never run and are not counted);
- only ``parallel/`` touches ``megatron.core.parallel_state``.

The AST check sees every path, also those a test run does not take; the subprocess test below
confirms the one that matters most on the real interpreter: the config loads without torch.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[3]
PKG = ROOT / "hpt_megatron"
DOC = ROOT / "docs" / "architecture.md"


@dataclass(frozen=True)
class Layer:
    name: str  # "config", "cli" (from `config/`, `cli.py`)
    allowed: frozenset[str]  # the packages of ours it may import
    forbidden: tuple[str, ...]  # outside modules it must not load ("torch", "megatron")


def _layer_name(cell: str) -> str:
    return cell.strip().strip("`").removesuffix("/").removesuffix(".py")


def read_layer_table(text: str) -> list[Layer]:
    """The rows of the table under ``## Layers``, top to bottom."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    names = [_layer_name(row[0]) for row in rows]
    layers = []
    for index, row in enumerate(rows):
        below = names[index + 1 :]
        items = [item.strip() for item in re.split(r"[,;]", row[-1]) if item.strip()]
        allowed, forbidden = set(), []
        for item in items:
            if item in ("everything below", "all below"):
                allowed.update(below)
            elif item.startswith("no "):
                forbidden.append(item.removeprefix("no ").strip("`"))
            elif item != "—":
                allowed.add(_layer_name(item))
        assert allowed <= set(below), f"{names[index]}: imports {allowed - set(below)} above it"
        layers.append(Layer(names[index], frozenset(allowed), tuple(forbidden)))
    return layers


def _module_name(path: pathlib.Path, pkg: pathlib.Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Every module an import statement names (``from a import b``: ``a`` and ``a.b``)."""
    names: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            names += [n for child in node.orelse for n in _runtime_imports(child)]
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        names += _runtime_imports(node)
    return names


def read_package(pkg: pathlib.Path) -> dict[str, list[str]]:
    """Module name -> the modules it imports at run time, for every module under ``pkg``."""
    return {
        _module_name(path, pkg): _runtime_imports(ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(pkg.rglob("*.py"))
    }


def _ours(name: str, modules: dict[str, list[str]]) -> list[str]:
    """The modules of ours that importing ``name`` runs: it (when it is a module, not a name
    from one) and the ``__init__`` of each package above it."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]


def loaded_by(start: str, modules: dict[str, list[str]]) -> set[str]:
    """The modules of ours that importing ``start`` can run (``start`` included)."""
    seen, todo = set(), _ours(start, modules)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [m for imported in modules[name] for m in _ours(imported, modules)]
    return seen


def _layer_of(module: str, top: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == top and len(parts) > 1 else None


def layer_offenders(pkg: pathlib.Path, layers: list[Layer]) -> list[str]:
    """Every break of the table's rules in the package at ``pkg``, as readable lines."""
    modules = read_package(pkg)
    by_name = {layer.name: layer for layer in layers}
    offenders = []
    for module, imports in modules.items():
        layer = _layer_of(module, pkg.name)
        if layer is None:
            continue
        if layer not in by_name:
            offenders.append(f"{module}: in no row of the layer table")
            continue
        rule = by_name[layer]
        targets = {_layer_of(imported, pkg.name): imported for imported in reversed(imports)}
        offenders += [
            f"{module}: imports {imported} ({layer} may import {sorted(rule.allowed)})"
            for target, imported in targets.items()
            if target not in (None, layer) and target not in rule.allowed
        ]
        for loaded in sorted(loaded_by(module, modules)):
            offenders += [
                f"{module}: loads {name}" + (f" (through {loaded})" if loaded != module else "")
                for name in modules[loaded]
                for banned in rule.forbidden
                if name == banned or name.startswith(banned + ".")
            ]
    return offenders


def test_the_documented_layer_table_holds():
    offenders = layer_offenders(PKG, read_layer_table(DOC.read_text()))
    assert not offenders, "\n".join(offenders)


def test_the_table_keeps_the_pure_layers_pure():
    """The rules DESIGN.md sets for the two pure layers stay in the table."""
    layers = {layer.name: layer for layer in read_layer_table(DOC.read_text())}
    assert "torch" in layers["config"].forbidden
    assert {"torch.distributed", "megatron"} <= set(layers["algorithms"].forbidden)


def test_only_parallel_reads_megatron_parallel_state():
    offenders = [
        f"{module}: {name}"
        for module, imports in read_package(PKG).items()
        if _layer_of(module, PKG.name) != "parallel"
        for name in imports
        if "parallel_state" in name
    ]
    assert not offenders, offenders


def test_the_config_loads_without_torch():
    code = (
        "import sys, hpt_megatron.config as c; assert 'torch' not in sys.modules; "
        "c.load_config('examples/tiny_cpu.yaml').algorithm.spec(); "
        "assert 'torch' not in sys.modules, 'loading a config imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


TABLE = """## Layers

| package | owns | imports |
|---|---|---|
| `cli.py` | the command | everything below |
| `algorithms/` | pure torch | config; no torch.distributed, no megatron |
| `config/` | the tree | no torch |

## Next
"""


def test_the_rules_can_fail(tmp_path):
    """The import that loaded torch with the config (``config/algorithm.py`` importing
    ``algorithms.spec``, whose package ``__init__`` imports torch) is caught, and so is an upward
    import, a module in no row and distributed code in ``algorithms/``."""
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "cli.py": "import pkg.config\n",
        "algorithms/__init__.py": "from pkg.algorithms.loss import policy_loss\n",
        "algorithms/loss.py": "import torch\nimport torch.distributed as dist\n",
        "algorithms/spec.py": "from pkg.config.base import check_value\n",
        "config/__init__.py": "",
        "config/base.py": "def check_value():\n    import pkg.cli\n",
        "config/algorithm.py": "from pkg.algorithms.spec import AlgorithmSpec\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    offenders = layer_offenders(pkg, read_layer_table(TABLE))
    assert "pkg.config.algorithm: loads torch (through pkg.algorithms.loss)" in offenders
    assert any(
        line.startswith("pkg.config.algorithm: imports pkg.algorithms.spec") for line in offenders
    )
    assert any(line.startswith("pkg.config.base: imports pkg.cli") for line in offenders)
    assert "pkg.algorithms.loss: loads torch.distributed" in offenders
    assert "pkg.stray: in no row of the layer table" in offenders
    (pkg / "config/algorithm.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
    )
    assert not [
        line
        for line in layer_offenders(pkg, read_layer_table(TABLE))
        if "pkg.config.algorithm" in line
    ]
