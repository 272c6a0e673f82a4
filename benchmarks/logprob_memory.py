"""Peak extra memory of per-token log-probs + entropy: plain log_softmax versus the chunked
vocab-parallel function, for T tokens over a V-word vocabulary (defaults: 2048 x 151,936, Qwen).

Each measurement runs in a fresh process: it allocates the logits (written in place, so no larger
temporary raises the peak first), warms the code path up on a tiny input, reads its resident set
size, runs the method once and reports ``peak RSS (ru_maxrss) - RSS before``: the memory beyond
the logits. A "probe" method that allocates exactly one fp32 [T, V] tensor checks that this
measures what it should.

    python benchmarks/logprob_memory.py    # bf16 and fp32, forward and forward+backward
    python benchmarks/logprob_memory.py --chunks 1024 256 --repeat 2
    python benchmarks/logprob_memory.py --chunks 0 1024   # 0: the default (element-sized) chunk

Forward+backward includes the gradient of the logits ([T, V] in their dtype), which any method
returns; the table also shows the extra memory without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def _run(method: str, logits, targets, backward: bool, chunk: int):
    import torch

    from hpt_megatron.parallel.logprobs import vocab_parallel_logprobs_entropy

    if method == "probe":
        return torch.ones(logits.shape, dtype=torch.float32)
    with torch.set_grad_enabled(backward):
        if method == "plain":
            logp_tv = torch.log_softmax(logits.float(), dim=-1)
            logprobs = logp_tv.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logp_tv.exp() * logp_tv).sum(-1)
            del logp_tv
        else:
            logprobs, entropy = vocab_parallel_logprobs_entropy(
                logits,
                targets,
                chunk_tokens=chunk or None,  # 0: the default (auto) size
            )
        if backward:
            (logprobs.sum() + 0.1 * entropy.sum()).backward()
    return logprobs, entropy


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    backward = args.mode == "fwd+bwd"

    def make(tokens: int, vocab: int):
        logits = torch.empty(tokens, vocab, dtype=dtype).normal_(0.0, 2.0)
        logits.requires_grad_(backward)
        return logits, torch.randint(0, vocab, (tokens,))

    _run(args.method, *make(8, 1000), backward, args.chunk)  # load kernels and code pages
    logits, targets = make(args.tokens, args.vocab)
    before_rss, before_peak = _rss(), _peak()
    out = _run(args.method, logits, targets, backward, args.chunk)
    peak = _peak()
    grad_bytes = logits.grad.numel() * logits.grad.element_size() if backward else 0
    print(
        json.dumps(
            {
                "extra_mb": (peak - before_rss) / MB,
                "slack_mb": (before_peak - before_rss) / MB,  # an earlier peak above the baseline
                "logits_mb": logits.numel() * logits.element_size() / MB,
                "grad_mb": grad_bytes / MB,
            }
        )
    )
    del out


def measure(method: str, dtype: str, mode: str, chunk: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--method",
        method,
        "--dtype",
        dtype,
        "--mode",
        mode,
        "--chunk",
        str(chunk),
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (the table shows the max)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fwd", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    fp32_mb = args.tokens * args.vocab * 4 / MB
    probe = measure("probe", "fp32", "fwd", 0, args)
    print(
        f"T={args.tokens} V={args.vocab}: one fp32 [T, V] = {fp32_mb:.0f} MB; "
        f"probe allocating exactly that measures {probe['extra_mb']:.0f} MB"
    )
    header = (
        f"{'dtype':5} {'mode':8} {'method':14} {'extra MB':>9} {'spread':>7} "
        f"{'-grad MB':>9} {'ratio':>6} {'ratio-grad':>10}"
    )
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        for mode in args.modes:
            base = None
            for method, chunk in [("plain", 0)] + [("chunked", c) for c in args.chunks]:
                runs = [measure(method, dtype, mode, chunk, args) for _ in range(args.repeat)]
                extra = max(r["extra_mb"] for r in runs)
                spread = extra - min(r["extra_mb"] for r in runs)
                slack = max(r["slack_mb"] for r in runs)
                no_grad = extra - runs[0]["grad_mb"]
                base = base or (extra, no_grad)
                name = "plain" if method == "plain" else f"chunked C={chunk}"
                flag = f"  (!) slack {slack:.0f} MB" if slack > 0.05 * extra else ""
                print(
                    f"{dtype:5} {mode:8} {name:14} {extra:9.0f} {spread:7.0f} {no_grad:9.0f} "
                    f"{extra / base[0]:6.3f} {no_grad / base[1]:10.3f}{flag}"
                )


if __name__ == "__main__":
    main()
