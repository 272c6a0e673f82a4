"""The transient host memory of gloo's ``all_gather_into_tensor`` and ``reduce_scatter_tensor``,
the two collectives of Megatron's distributed optimizer (parameter all-gather, gradient
reduce-scatter), on CPU tensors the size of a model.

Each rank preallocates the input and output tensors, then calls each collective twice and
reports, per call, its peak resident set above the resident set before the call (``VmHWM``,
reset before each call through ``/proc/self/clear_refs``) and how much the resident set
(``VmRSS``) grew: a peak that rises while the resident set does not is a temporary the
collective allocated and freed (NCCL writes into the output in place; gloo stages through a
buffer of its own). Explains the gap between the distributed optimizer's peak and resident
memory in ``dist_optimizer_memory.py``.

    torchrun --nproc_per_node 2 benchmarks/gloo_collective_memory.py [--params 91.6e6]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

MB = 2**20


def _status(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set (Linux 4.0+)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=91.6e6, help="elements (the model's size)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world, n = dist.get_world_size(), int(args.params) // dist.get_world_size()
    gathered = torch.zeros(n * world, dtype=torch.bfloat16)  # the bf16 parameter buffer
    shard = torch.ones(n, dtype=torch.bfloat16)
    grads = torch.ones(n * world, dtype=torch.float32)  # the fp32 gradient buffer
    grad_shard = torch.zeros(n, dtype=torch.float32)
    calls = {
        "all_gather_into_tensor (bf16 params)": lambda: dist.all_gather_into_tensor(
            gathered, shard
        ),
        "reduce_scatter_tensor (fp32 grads)": lambda: dist.reduce_scatter_tensor(grad_shard, grads),
    }
    report: dict[str, object] = {
        "rank": dist.get_rank(),
        "bf16_model_mb": gathered.nbytes / MB,
        "fp32_grads_mb": grads.nbytes / MB,
    }
    dist.barrier()
    for name, call in calls.items():
        for i in range(2):
            _reset_peak()
            rss = _status("VmRSS")
            call()
            dist.barrier()
            report[f"{name} #{i + 1}"] = {
                "peak_above_start_mb": round(_status("VmHWM") - rss, 1),
                "resident_growth_mb": round(_status("VmRSS") - rss, 1),
            }
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
