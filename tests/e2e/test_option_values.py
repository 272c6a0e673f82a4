"""Every config option value that validation accepts either trains two steps of the tiny CPU config
or is rejected (when the config loads, by ``--dry-run``'s preflight, or at ``hpt train`` startup)
with a message naming the key.

The values are enumerated from the config tree's type hints (every ``Literal`` value and both
``bool`` values of every section field, the algorithm options included), so a new option is
covered without touching this file; plus every algorithm preset and the numeric settings that
``hpt train`` cannot carry out yet. Values equal to the tiny config's own are covered by one
baseline run. Rejections are checked in-process; accepted values train in a subprocess each,
except accepted presets, which ``test_train_e2e.test_every_preset_trains_a_step`` trains.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
import typing
from typing import Any

import pytest

from hpt_megatron.cli import main
from hpt_megatron.config import ConfigError, HPTConfig, load_config
from hpt_megatron.config.presets import PRESETS
from tests.e2e.test_train_e2e import PRESETS as TRAINED_PRESETS
from tests.helpers.forked import run_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny_cpu.yaml")
pytestmark = pytest.mark.slow

SMALL = [
    "run.steps=2",
    "parallel.tp=1",
    "run.val_every=0",
    "checkpoint.export_hf=false",
    "checkpoint.save_every=0",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=32",
    "data.max_response_tokens=32",
    "data.arithmetic.train_size=64",
    "data.arithmetic.test_size=8",
    "logging.progress_bar=false",
    "reward.num_workers=1",
]
# Settings a value cannot be accepted without (a value alone would be rejected for another key).
NEEDS = {
    ("model.fp8", "e4m3"): ["model.params_dtype=bf16"],
    ("model.fp8", "hybrid"): ["model.params_dtype=bf16"],
    ("model.recompute_granularity", "full"): [
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
    ],
    ("algorithm.options.batch_rule", "sft_then_rl"): ["algorithm.options.switch_step=1"],
    ("algorithm.options.mask", "seq_clip"): ["algorithm.options.denominator=gspo"],
    ("algorithm.preset", "sft_then_grpo"): ["algorithm.options.switch_step=1"],
}
# Values the type hints do not enumerate: a KL penalty (a reference policy) and settings hpt train
# cannot run yet.
EXTRA = [("algorithm.options.kl_coef", 0.1), ("parallel.cp", 2)]


def _values(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return [v for arg in args if arg is not type(None) for v in _values(arg)]
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    return [True, False] if tp is bool else []


def _walk(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += _walk(tp, f"{prefix}{f.name}.")
        else:
            out += [(f"{prefix}{f.name}", v) for v in _values(tp)]
    return out


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cases() -> list[tuple[str, Any]]:
    base = load_config(TINY, SMALL)
    spec = base.algorithm.spec()  # an option left None runs the preset's value

    def baseline_value(key: str) -> Any:
        if key.startswith("algorithm.options."):
            return getattr(spec, key.rsplit(".", 1)[1])
        return _get(base, key)

    cases = [(key, value) for key, value in _walk(HPTConfig) if baseline_value(key) != value]
    presets = [("algorithm.preset", p) for p in sorted(PRESETS) if p != base.algorithm.preset]
    return [("baseline", None), *cases, *presets, *EXTRA]


def _train(overrides: list[str], out: pathlib.Path) -> tuple[int, str]:
    """``hpt train`` of the tiny config, in a process forked after the imports (one process)."""
    return run_cli(["train", TINY, *overrides], out.parent / "train.log")


@pytest.mark.parametrize(("key", "value"), _cases(), ids=lambda v: _text(v))
def test_option_value_trains_or_is_rejected_naming_the_key(
    key, value, tmp_path, capsys, monkeypatch
):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    overrides = [*SMALL, f"run.output_dir={out}"]
    if key != "baseline":
        overrides += [*NEEDS.get((key, value), []), f"{key}={_text(value)}"]
    try:
        load_config(TINY, overrides)
    except ConfigError as err:
        assert key in str(err), str(err)
        return
    code = main(["train", TINY, *overrides, "--dry-run"])
    err = capsys.readouterr().err
    if code == 2:  # a check of this machine (GPU, SGLang, ...): hpt train makes the same one
        assert err.startswith("hpt train: config error: ") and key in err, err
        return
    assert code == 0, err
    if key == "algorithm.preset":
        assert value in [*TRAINED_PRESETS, "dapo"], f"add preset {value} to test_train_e2e"
        return
    code, output = _train(overrides, out)
    assert code == 0, output[-5000:]
    if key == "logging.jsonl" and value is False:
        assert not (out / "metrics.jsonl").exists()
        assert (out / "checkpoints").is_dir()
        return
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_setting_this_machine_cannot_run_is_rejected_at_startup(tmp_path):
    """Not only ``--dry-run``: ``hpt train`` runs the same preflight before building anything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("nccl runs on a GPU machine")
    out = tmp_path / "run"
    code, output = _train([*SMALL, f"run.output_dir={out}", "parallel.backend=nccl"], out)
    assert code == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("hpt train: config error: parallel.backend: nccl needs GPUs")
    assert "Traceback" not in output
