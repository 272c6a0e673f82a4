"""Peak memory and time of per-token log-probs + entropy from the final hidden states, for T
tokens, hidden size H and a V-word vocabulary (defaults: 2048 x 896 x 151,936, Qwen2.5-0.5B):

- ``plain``: ``logits = hidden @ weight.T`` then ``log_softmax(logits.float())`` (peers' path);
- ``chunked``: the same logits then ``vocab_parallel_logprobs_entropy`` (the path before the
  fused output layer);
- ``fused``: ``fused_logprobs_entropy(hidden, weight)``, the training path now (no logits).

Each measurement runs in a fresh process: it allocates the hidden states and the output weight
(written in place, so no larger temporary raises the peak first), warms the code path up on a
tiny input, reads its resident set size, runs the method once and reports
``peak RSS (ru_maxrss) - RSS before``: everything the method adds, the logits and their gradient
included, and the gradients of the hidden states and the weight (which every method returns;
the table also shows the figure without them). A "probe" that allocates exactly one fp32 [T, V]
tensor checks that this measures what it should. Times are the wall time of the method
(forward, or forward + backward), the median over ``--repeat`` fresh processes run interleaved
(the machine is shared: compare the ratios, measured in the same run).

    python benchmarks/logprob_memory.py                      # fp32, forward + backward
    python benchmarks/logprob_memory.py --dtypes bf16 fp32 --modes fwd fwd+bwd --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MB = 2**20
METHODS = ("plain", "chunked", "fused")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def _run(method: str, hidden, weight, targets, backward: bool, chunk: int | None):
    import torch

    from hpt_megatron.parallel.logprobs import (
        fused_logprobs_entropy,
        vocab_parallel_logprobs_entropy,
    )

    if method == "probe":
        return torch.ones(hidden.shape[0], weight.shape[0], dtype=torch.float32)
    with torch.set_grad_enabled(backward):
        if method == "plain":
            logp_tv = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
            logprobs = logp_tv.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logp_tv.exp() * logp_tv).sum(-1)
            del logp_tv
        elif method == "chunked":
            logprobs, entropy = vocab_parallel_logprobs_entropy(
                hidden @ weight.t(), targets, chunk_tokens=chunk
            )
        else:
            logprobs, entropy = fused_logprobs_entropy(hidden, weight, targets, chunk_tokens=chunk)
        if backward:
            (logprobs.sum() + 0.1 * entropy.sum()).backward()
    return logprobs, entropy


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    backward = args.mode == "fwd+bwd"
    chunk = args.chunk or None

    def make(tokens: int, hidden_size: int, vocab: int):
        hidden = torch.empty(tokens, hidden_size, dtype=dtype).normal_(0.0, 1.0)
        weight = torch.empty(vocab, hidden_size, dtype=dtype).normal_(0.0, 2.0 / hidden_size**0.5)
        hidden.requires_grad_(backward)
        weight.requires_grad_(backward)
        return hidden, weight, torch.randint(0, vocab, (tokens,))

    _run(args.method, *make(8, 16, 1000), backward, chunk)  # load kernels and code pages
    hidden, weight, targets = make(args.tokens, args.hidden, args.vocab)
    before_rss, before_peak = _rss(), _peak()
    start = time.perf_counter()
    out = _run(args.method, hidden, weight, targets, backward, chunk)
    seconds = time.perf_counter() - start
    peak = _peak()
    grads = [t.grad for t in (hidden, weight) if t.grad is not None]
    print(
        json.dumps(
            {
                "extra_mb": (peak - before_rss) / MB,
                "slack_mb": (before_peak - before_rss) / MB,  # an earlier peak above the baseline
                "param_grad_mb": sum(g.numel() * g.element_size() for g in grads) / MB,
                "seconds": seconds,
            }
        )
    )
    del out


def measure(method: str, dtype: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--method", method, "--dtype", dtype]
    cmd += ["--mode", mode, "--chunk", str(args.chunk), "--tokens", str(args.tokens)]
    cmd += ["--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk; 0: the default")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"])
    ap.add_argument("--modes", nargs="+", default=["fwd+bwd"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="fwd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    fp32_mb = args.tokens * args.vocab * 4 / MB
    probe = measure("probe", "fp32", "fwd", args)
    print(
        f"T={args.tokens} H={args.hidden} V={args.vocab}: one fp32 [T, V] = {fp32_mb:.0f} MB; "
        f"probe allocating exactly that measures {probe['extra_mb']:.0f} MB"
    )
    header = (
        f"{'dtype':5} {'mode':8} {'method':8} {'extra MB':>9} {'-pgrad MB':>9} {'mem ratio':>9} "
        f"{'s (median)':>10} {'s ratio to chunked':>18}"
    )
    print(header)
    print("-" * len(header))
    for dtype in args.dtypes:
        for mode in args.modes:
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for _ in range(args.repeat):  # interleaved: load on the machine hits all alike
                for method in METHODS:
                    runs[method].append(measure(method, dtype, mode, args))
            extra = {m: max(r["extra_mb"] for r in runs[m]) for m in METHODS}
            secs = {m: statistics.median(r["seconds"] for r in runs[m]) for m in METHODS}
            for method in METHODS:
                slack = max(r["slack_mb"] for r in runs[method])
                flag = f"  (!) slack {slack:.0f} MB" if slack > 0.05 * extra[method] else ""
                no_grad = extra[method] - runs[method][0]["param_grad_mb"]
                print(
                    f"{dtype:5} {mode:8} {method:8} {extra[method]:9.0f} {no_grad:9.0f} "
                    f"{extra[method] / extra['plain']:9.3f} {secs[method]:10.2f} "
                    f"{secs[method] / secs['chunked']:18.3f}{flag}"
                )


if __name__ == "__main__":
    main()
