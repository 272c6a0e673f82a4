"""Driver-rank memory and time of one disk weight sync at PP=2: every stage writing its own shards
(``rollout.weight_sync.disk.DiskPusher``) versus the old funnel through rank 0.

A random bf16 Megatron model of Qwen2.5-0.5B's shape (vocab 151936, hidden 896, 24 layers, tied
embeddings: the last stage holds its own copy of the output embedding, as Megatron keeps it) is
built at PP=2 over 2 gloo processes. In the same run, on every rank:

- ``new``: ``DiskPusher(root, ...).push(1, sink)``: each stage writes its shards into
  ``root/v1.tmp`` bucket by bucket, the driver writes the index, config.json, renames the folder
  and hands it to the sink;
- ``old``: the path this replaced, kept here only (:func:`old_gather_sync`): every rank's buckets
  materialised, ``gather_object``-ed to rank 0, written there as one file per bucket
  (``rollout.weight_sync.disk.write_snapshot``);
- ``save_file``: the whole model's tensors written once, by one process, with
  ``safetensors.torch.save_file`` (the time floor the sync is compared with).

Memory: the peak of the driver's resident set (``VmRSS`` of ``/proc/self/status``, sampled every
2 ms by a thread) minus its value just before the sync, divided by the model's bytes (the index's
``total_size``). ``new`` runs first, then ``old`` (after ``malloc_trim``), so that ``new`` cannot
profit from heap that ``old`` left behind. The sink only records the folder: no SGLang server
loads it (the figure is the driver's sync path, the disk writes included; a server's own load is
another process).

Usage (2 processes, from the repository root; ``--layers`` / ``--vocab`` shrink the model):

    torchrun --nproc_per_node 2 -m benchmarks.weight_sync_memory [--out DIR] [--bucket-mib 512]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpt_megatron.config.sections import ModelConfig, ParallelConfig
from hpt_megatron.models.export import rank_export_buckets
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.rollout.weight_sync.disk import DiskPusher, write_snapshot
from tests.helpers.tiny_hf import QWEN25_05B_SHAPE


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Samples VmRSS in a thread while the ``with`` block runs; ``peak - start`` is the growth."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s = every_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


class RecordingSink:
    """The driver's sink: notes the folder it is asked to load (no server here)."""

    def __init__(self) -> None:
        self.loaded: list[tuple[Path, int]] = []

    def update_weights(self, buckets: Any, version: int) -> None:
        raise AssertionError("the disk path hands over a folder, not buckets")

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        self.loaded.append((Path(path), version))


def old_gather_sync(chunks: list, hf: Any, ctx: Any, root: Path, version: int, bucket: int) -> int:
    """The funnel this issue removed: buckets gathered to rank 0, which writes them all."""
    mine = list(rank_export_buckets(chunks, hf, ctx, bucket))
    gathered: list[Any] = [None] * ctx.world_size
    dist.gather_object(mine, gathered if ctx.is_driver else None, dst=0, group=ctx.cpu_group)
    if not ctx.is_driver:
        return 0
    buckets = [b for rank_buckets in gathered for b in rank_buckets]
    write_snapshot(buckets, root, version)
    return sum(t.numel() * t.element_size() for b in buckets for _, t in b)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def random_pp2_model(shape: dict[str, Any]) -> tuple[Any, Any, list]:
    """This rank's stage of a random bf16 Qwen2 model of ``shape`` at PP=2 (gloo), every page
    touched: ``(ctx, hf, chunks)``."""
    parallel = ParallelConfig(pp=2)
    ctx = init_distributed(parallel, seed=0)
    hf = load_hf_config({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **shape})
    model = ModelConfig(inline=hf.to_dict(), params_dtype="bf16")
    chunks = build_model_chunks(hf, model, parallel, pp_rank=ctx.pp_rank, init_weights=False)
    with torch.no_grad():  # touch every page: the parameters are resident before any sync
        for chunk in chunks:
            for param in chunk.parameters():
                param.normal_(0.0, 0.02)
    return ctx, hf, chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--layers", type=int, default=QWEN25_05B_SHAPE["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=QWEN25_05B_SHAPE["vocab_size"])
    args = parser.parse_args()
    shape = {**QWEN25_05B_SHAPE, "num_hidden_layers": args.layers, "vocab_size": args.vocab}
    ctx, hf, chunks = random_pp2_model(shape)
    bucket = args.bucket_mib << 20
    work = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "hpt_ws_bench"
    if ctx.is_driver:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    dist.barrier(group=ctx.cpu_group)
    result: dict[str, Any] = {"bucket_mib": args.bucket_mib, "shape": shape, "pp": 2}

    sink = RecordingSink() if ctx.is_driver else None
    _trim()
    dist.barrier(group=ctx.cpu_group)
    with PeakRSS() as new_mem:
        t0 = time.perf_counter()
        pusher = DiskPusher(work / "new", chunks, hf, ctx, bucket_bytes=bucket)
        model_bytes = pusher.push(1, sink)
        new_s = time.perf_counter() - t0
    _trim()
    dist.barrier(group=ctx.cpu_group)
    with PeakRSS() as old_mem:
        t0 = time.perf_counter()
        old_bytes = old_gather_sync(chunks, hf, ctx, work / "old", 1, bucket)
        old_s = time.perf_counter() - t0
    dist.barrier(group=ctx.cpu_group)
    if ctx.is_driver:
        from safetensors.torch import load_file, save_file

        assert sink is not None and sink.loaded == [(work / "new" / "v1", 1)]
        assert old_bytes == model_bytes, (old_bytes, model_bytes)
        del chunks
        _trim()
        state: dict[str, torch.Tensor] = {}
        for shard in sorted((work / "new" / "v1").glob("*.safetensors")):
            state.update(load_file(shard))
        t0 = time.perf_counter()
        save_file(state, str(work / "once.safetensors"))
        save_s = time.perf_counter() - t0
        result.update(
            model_bytes=model_bytes,
            driver_rss_before_gib=new_mem.start / 2**30,
            new_peak_growth_ratio=new_mem.growth / model_bytes,
            old_peak_growth_ratio=old_mem.growth / model_bytes,
            new_sync_s=new_s,
            old_sync_s=old_s,
            save_file_s=save_s,
            new_vs_save_file=new_s / save_s,
            old_vs_save_file=old_s / save_s,
        )
        print(json.dumps(result), flush=True)
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    dist.barrier(group=ctx.cpu_group)
    shutdown_distributed()


if __name__ == "__main__":
    main()
