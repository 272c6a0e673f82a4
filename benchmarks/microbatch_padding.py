"""Padding efficiency (real tokens / computed tokens) of token-budget micro-batching versus
fixed-count micro-batches, and of sequence packing (``trainer.packing``: several sequences per
row, rows grouped by the same budget), on a long-tailed (lognormal) length distribution, in the
same run.

The fixed-count baseline gets the same number of micro-batches as the token budget produced (so
the same number of forward/backward calls), taking sequences in their arrival order.

    python benchmarks/microbatch_padding.py
    python benchmarks/microbatch_padding.py --num 1024 --median 1024 --max-len 8192 --budget 16384
"""

from __future__ import annotations

import argparse
import math
import random
import statistics

from hpt_megatron.trainer.batching import (
    fixed_count_microbatches,
    packed_efficiency,
    packed_microbatches,
    padding_efficiency,
    token_budget_microbatches,
)


def lognormal_lengths(num: int, median: int, sigma: float, max_len: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [
        min(max_len, max(1, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(num)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num", type=int, default=1024, help="sequences in the step")
    ap.add_argument("--median", type=int, default=1024)
    ap.add_argument("--sigma", type=float, default=0.8, help="lognormal shape (log-space std)")
    ap.add_argument("--max-len", type=int, default=8192)
    ap.add_argument("--budget", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--multiple", type=int, default=1, help="pad each micro-batch to this multiple")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()

    print(
        f"{args.num} sequences, lognormal median {args.median}, sigma {args.sigma}, "
        f"capped at {args.max_len}; {args.seeds} seeds (mean over seeds)"
    )
    header = (
        f"{'budget':>7} {'#mb':>6} {'real Mtok':>10} {'budget Mtok':>12} {'budget eff':>10} "
        f"{'fixed size':>10} {'fixed Mtok':>11} {'fixed eff':>9} {'#mb packed':>10} "
        f"{'packed eff':>10}"
    )
    print(header)
    print("-" * len(header))
    for budget in args.budget:
        rows = []
        for seed in range(args.seeds):
            lengths = lognormal_lengths(args.num, args.median, args.sigma, args.max_len, seed)
            by_budget = token_budget_microbatches(lengths, budget)
            size = math.ceil(args.num / len(by_budget))  # same micro-batch count on average
            fixed = fixed_count_microbatches(args.num, size)
            eff_b = padding_efficiency(lengths, by_budget, args.multiple)
            eff_f = padding_efficiency(lengths, fixed, args.multiple)
            packed = packed_microbatches(lengths, budget)
            eff_p = packed_efficiency(lengths, packed, args.multiple)
            real = sum(lengths)
            rows.append(
                (len(by_budget), real, real / eff_b, eff_b, size, real / eff_f, eff_f)
                + (len(packed), eff_p)
            )
        mean = [statistics.fmean(col) for col in zip(*rows)]
        print(
            f"{budget:7d} {mean[0]:6.1f} {mean[1] / 1e6:10.3f} {mean[2] / 1e6:12.3f} "
            f"{mean[3]:10.3f} {mean[4]:10.1f} {mean[5] / 1e6:11.3f} {mean[6]:9.3f} "
            f"{mean[7]:10.1f} {mean[8]:10.4f}"
        )
    lengths = lognormal_lengths(args.num, args.median, args.sigma, args.max_len, 0)
    capped = sum(x >= args.max_len for x in lengths)
    median, mean = statistics.median(lengths), statistics.fmean(lengths)
    print(
        f"seed 0 lengths: median {median:.0f}, mean {mean:.0f}, max {max(lengths)}, "
        f"{capped} at the cap"
    )


if __name__ == "__main__":
    main()
