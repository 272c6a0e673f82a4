"""Weight-sync time into a CPU SGLang server, against writing the same bytes.

For each model (the tiny test model, and a random model of Qwen2.5-0.5B's shape) this starts one
SGLang server on CPU, then times, in the same run:
- ``file``: writing the weights' raw bytes to one file (the floor for any disk-based sync);
- ``disk``: the disk transport (safetensors snapshot + ``/update_weights_from_disk``);
- ``cpu-engine``: the in-process CPU engine's in-place ``update_weights`` (no server).

Usage, from the repository root (the tiny model comes from ``tests.helpers``):

    python -m benchmarks.sglang_weight_sync [--models tiny,qwen0.5b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.cpu_engine import HFCpuEngine
from hpt_megatron.rollout.sglang import SGLangEngine
from tests.helpers.tiny_hf import QWEN25_05B_SHAPE, build_tiny_model, tiny_config

BUCKET_BYTES = 256 << 20


def _buckets(state: dict[str, torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    buckets, current, size = [], [], 0
    for name, tensor in state.items():
        if current and size + tensor.nbytes > BUCKET_BYTES:
            buckets.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += tensor.nbytes
    return [*buckets, current] if current else buckets


def _write_raw(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as fh:
        for tensor in state.values():
            fh.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _time(fn, repeats: int) -> float:  # a thunk
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, repeats: int, work: Path) -> dict[str, object]:
    if name == "tiny":
        config, dtype = tiny_config(), "float32"
    else:
        config, dtype = tiny_config(**QWEN25_05B_SHAPE, torch_dtype="bfloat16"), "bfloat16"
    model_dir = work / name
    model = build_tiny_model(model_dir, config=config, init_std=0.02)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(model_dir)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:  # the export sends a tied matrix once
        state.pop("lm_head.weight", None)
    nbytes = sum(t.nbytes for t in state.values())
    version = iter(range(1, 10_000))
    out: dict[str, object] = {"model": name, "params": sum(t.numel() for t in state.values())}
    out["bytes"] = nbytes
    out["file_s"] = _time(lambda: _write_raw(state, work / "raw.bin"), repeats)

    cpu_engine = HFCpuEngine(model)
    out["cpu_engine_s"] = _time(lambda: cpu_engine.update_weights(_buckets(state), 1), repeats)

    cfg = SGLangConfig(
        device="cpu",
        dtype=dtype,
        max_total_tokens=4096,
        extra_args=["--skip-server-warmup"],
        weight_sync_dir=str(work / "sync"),
        startup_timeout_s=900,
    )
    t0 = time.perf_counter()
    with SGLangEngine.launch(cfg, model_path=model_dir, run_dir=work / f"run_{name}") as engine:
        out["server_start_s"] = time.perf_counter() - t0
        out["disk_s"] = _time(
            lambda: engine.update_weights(_buckets(state), next(version)), repeats
        )
        out["disk_split"] = engine.transport.last_timing
    for key in ("disk_s", "cpu_engine_s"):
        if isinstance(out.get(key), float):
            out[key.replace("_s", "_vs_file")] = round(out[key] / out["file_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,qwen0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="hpt_sync_bench_") as tmp:
        for name in args.models.split(","):
            print(json.dumps(bench_model(name, args.repeats, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
