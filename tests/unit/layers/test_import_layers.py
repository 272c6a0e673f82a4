"""The one-way import rules of docs/architecture.md (Layers), checked on the source (AST, no
imports run):
``algorithms/`` and ``config/`` import neither ``torch.distributed`` nor ``megatron``, and only
``parallel/`` touches ``megatron.core.parallel_state``."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[3] / "hpt_megatron"


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("layer", ["algorithms", "config"])
def test_pure_layers_import_no_distributed_code(layer):
    offenders = [
        f"{path.relative_to(PKG)}: {name}"
        for path in sorted((PKG / layer).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(("torch.distributed", "megatron")) or name == "torch.distributed"
    ]
    assert not offenders, offenders


def test_only_parallel_reads_megatron_parallel_state():
    offenders = [
        f"{path.relative_to(PKG)}: {name}"
        for path in sorted(PKG.rglob("*.py"))
        if "parallel" not in path.relative_to(PKG).parts[:1]
        for name in _imports(path)
        if "parallel_state" in name
    ]
    assert not offenders, offenders


def test_the_rule_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from megatron.core import parallel_state\nimport torch.distributed as dist\n")
    names = _imports(bad)
    assert "megatron.core.parallel_state" in names and "torch.distributed" in names
