"""Weight-sync time and driver memory per transport into two real CPU SGLang servers, at PP=2.

A random bf16 Megatron model of Qwen2.5-0.5B's shape (``--layers`` / ``--vocab`` shrink it) is
built at PP=2 over 2 gloo processes. The driver exports it once as the servers' starting
checkpoint and starts two CPU SGLang servers on it (``SGLangEngine.launch``). Then, in the same
run and on the same servers, each transport pushes the model ``--repeats`` times, every rank
taking part as in ``hpt train``:

- ``disk``: ``DiskPusher`` (each stage writes its shards, both servers load the folder);
- ``distributed``: ``DistributedPusher`` (each stage broadcasts into its gloo update group;
  the first push also builds the groups, so the median is of the pushes after it);
- ``tensor``: ``DistributedPusher(kind="tensor")`` (each stage posts handles to its buckets'
  shared memory).

Reported per transport: the median push time, its ratio to disk's, and the driver rank's peak
resident-memory growth during a push (``VmRSS`` sampled every 2 ms, ``PeakRSS`` of
``weight_sync_memory.py``) as a share of the model's bytes. The driver is also stage 0's
exporting rank; the servers are other processes and are not counted.

Usage (from the repository root; needs ``bash tools/sglang_env.sh``):

    torchrun --nproc_per_node 2 -m benchmarks.weight_sync_transports [--layers 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from benchmarks.weight_sync_memory import PeakRSS, _trim, random_pp2_model
from hpt_megatron.parallel.runtime import shutdown_distributed
from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.weight_sync.disk import DiskPusher, DiskTransport
from hpt_megatron.rollout.weight_sync.distributed import DistributedTransport
from hpt_megatron.rollout.weight_sync.distributed_pusher import DistributedPusher
from hpt_megatron.rollout.weight_sync.tensor import TensorTransport
from tests.helpers.sglang_cpu import server_config
from tests.helpers.tiny_hf import QWEN25_05B_SHAPE, build_byte_tokenizer

BUCKET = 256 << 20


def _pusher(kind: str, work: Path, chunks: list, hf: Any, ctx: Any) -> Any:
    if kind == "disk":
        return DiskPusher(work / "disk", chunks, hf, ctx, bucket_bytes=BUCKET)
    return DistributedPusher(
        chunks, hf, ctx, backend="gloo", timeout_s=900, kind=kind, bucket_bytes=BUCKET
    )


def _transport(kind: str, work: Path) -> Any:
    if kind == "disk":
        return DiskTransport(work / "disk")
    if kind == "distributed":
        return DistributedTransport("gloo", 900)
    return TensorTransport(900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--layers", type=int, default=QWEN25_05B_SHAPE["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=QWEN25_05B_SHAPE["vocab_size"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="disk,distributed,tensor")
    args = parser.parse_args()
    shape = {**QWEN25_05B_SHAPE, "num_hidden_layers": args.layers, "vocab_size": args.vocab}
    shape.update(eos_token_id=256, bos_token_id=258, pad_token_id=257)  # the byte tokenizer's
    ctx, hf, chunks = random_pp2_model(shape)
    work = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "hpt_ws_transports"
    if ctx.is_driver:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    dist.barrier(group=ctx.cpu_group)
    start = DiskPusher(work / "start", chunks, hf, ctx, tokenizer=build_byte_tokenizer())
    start_sink = _FolderSink() if ctx.is_driver else None
    model_bytes = start.push(0, start_sink)
    engine = None
    if ctx.is_driver:
        assert start_sink is not None and start_sink.folder is not None
        cfg = server_config(max_total_tokens=4096, servers_per_node=2, router=False)
        engine = SGLangEngine.launch(cfg, model_path=start_sink.folder, run_dir=work)
    dist.barrier(group=ctx.cpu_group)
    sizes = [0] * ctx.world_size
    dist.all_gather_object(sizes, model_bytes, group=ctx.cpu_group)
    total = sum(sizes)
    result: dict[str, Any] = {"shape": shape, "pp": 2, "servers": 2, "model_bytes": total}
    version = 0
    for kind in args.transports.split(","):
        if engine is not None:
            engine.transport = _transport(kind, work)
        pusher = _pusher(kind, work, chunks, hf, ctx)
        times, growth = [], []
        for _ in range(args.repeats):
            version += 1
            _trim()
            dist.barrier(group=ctx.cpu_group)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                pusher.push(version, engine)
                dist.barrier(group=ctx.cpu_group)
                times.append(time.perf_counter() - t0)
            growth.append(mem.growth / total)
        pusher.close()
        if engine is not None:
            engine.admin(engine.transport.close)
        steady = times[1:] if kind == "distributed" and len(times) > 1 else times
        result[kind] = {
            "push_s": statistics.median(steady),
            "first_push_s": times[0],
            "driver_peak_growth_ratio": max(growth),
        }
    if ctx.is_driver:
        assert engine is not None
        engine.shutdown()
        disk_s = result.get("disk", {}).get("push_s")
        for kind in args.transports.split(","):
            if disk_s:
                result[kind]["vs_disk"] = result[kind]["push_s"] / disk_s
        print(json.dumps(result), flush=True)
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    dist.barrier(group=ctx.cpu_group)
    shutdown_distributed()


class _FolderSink:
    """The driver's sink for the starting checkpoint: notes the folder (no server yet)."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def update_weights(self, buckets: Any, version: int) -> None:
        raise AssertionError("the disk path hands over a folder")

    def update_weights_from_disk(self, path: str | Path, version: int) -> None:
        self.folder = Path(path)


if __name__ == "__main__":
    main()
