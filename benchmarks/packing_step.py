"""Training step time with sequence packing (``trainer.packing``) versus padded micro-batches on
the same batch, through the Megatron engine on one process (CPU: local attention), interleaved
rounds; also prints each layout's padding efficiency and computed attention-score elements.

The batch: ``--num`` sequences with lognormal lengths (long-tailed, as in
``benchmarks/microbatch_padding.py``), on the tiny Llama of ``examples/tiny_cpu.yaml``; the loss
is the token-mean NLL of the response tokens (the same work for both layouts).

    python benchmarks/packing_step.py
    python benchmarks/packing_step.py --num 128 --median 96 --budget 4096 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.models.provider import build_model_chunks, load_hf_config
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.trainer.batching import MicroBatch
from hpt_megatron.trainer.build import build_engine
from hpt_megatron.trainer.update import UpdateLayout, local_microbatches

TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=128,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


class TokenMeanNLL:
    def __init__(self, total_tokens: int) -> None:
        self.total_tokens = total_tokens

    def __call__(self, logprobs_bs, entropy_bs, mb: MicroBatch):
        mask_bs = mb.loss_mask_bs.to(logprobs_bs.device)
        return -(logprobs_bs * mask_bs).sum() / self.total_tokens, {"tokens": mask_bs.sum()}


def make_samples(num: int, median: int, sigma: float, max_len: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        n = min(max_len, max(4, round(rng.lognormvariate(math.log(median), sigma))))
        prompt = max(2, n // 4)
        ids = [rng.randrange(3, 128) for _ in range(n)]
        out.append(
            Sample(prompt_id=str(i), group_id=i, prompt_ids=ids[:prompt], response_ids=ids[prompt:])
        )
    return out


def computed(mbs: list[MicroBatch]) -> tuple[int, int]:
    """(tokens, attention-score elements per head and layer) the model computes."""
    tokens = scores = 0
    for mb in mbs:
        rows, width = mb.model_shape
        tokens += rows * width
        scores += rows * width * width
    return tokens, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--num", type=int, default=64, help="sequences in the batch")
    ap.add_argument("--median", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--budget", type=int, default=2048, help="max_tokens_per_microbatch")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after one warm-up)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    parallel = ParallelConfig(backend="gloo")
    ctx = init_distributed(parallel, seed=1)
    hf = load_hf_config(TINY)
    trainer = TrainerConfig(lr=1e-4, max_tokens_per_microbatch=args.budget)
    chunks = build_model_chunks(hf, ModelConfig(inline=TINY), parallel, pp_rank=0)
    engine = build_engine(chunks, ctx, trainer, total_steps=1000, vocab_size=hf.vocab_size)

    samples = make_samples(args.num, args.median, args.sigma, args.max_len, seed=0)
    real = sum(s.num_tokens for s in samples)
    loss = TokenMeanNLL(sum(len(s.response_ids) for s in samples))
    layouts = {
        name: local_microbatches(samples, UpdateLayout(max_tokens=args.budget, packing=packing))
        for name, packing in (("padded", False), ("packed", True))
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for round_ in range(args.rounds + 1):
        for name, mbs in layouts.items():
            t0 = time.perf_counter()
            engine.train_step(mbs, loss)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    lens = sorted(s.num_tokens for s in samples)
    print(
        f"{args.num} sequences, lognormal median {args.median} sigma {args.sigma} "
        f"(max {lens[-1]}), budget {args.budget}, {args.rounds} interleaved rounds, 1 thread"
    )
    print(f"{'layout':>7} {'#mb':>4} {'rows':>5} {'pad eff':>8} {'scores M':>9} {'step s':>8}")
    for name, mbs in layouts.items():
        tokens, scores = computed(mbs)
        rows = sum(mb.model_shape[0] for mb in mbs)
        step = statistics.median(times[name])
        print(
            f"{name:>7} {len(mbs):4d} {rows:5d} {real / tokens:8.3f} {scores / 1e6:9.2f} "
            f"{step:8.3f}"
        )
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    print(f"packed / padded step time: {ratio:.3f}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
