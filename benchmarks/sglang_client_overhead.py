"""Generation throughput through ``SGLangEngine`` against direct HTTP, same requests, same run.

Starts one SGLang server on CPU with the tiny model, then alternates (to share any drift in
machine load): the engine's ``generate`` (client: balancing, retries, parsing into
``Generation``) and a bare aiohttp loop posting the identical ``/generate`` bodies with the same
concurrency and reading the JSON. Reports tokens/s of each and the client's overhead.

Usage, from the repository root (the tiny model comes from ``tests.helpers``):

    python -m benchmarks.sglang_client_overhead [--prompts 64] [--n 8] [--tokens 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import SGLangEngine
from hpt_megatron.rollout.sglang.protocol import sampling_payload
from tests.helpers.tiny_hf import build_tiny_model


async def _direct(url: str, prompts: list[list[int]], params: SamplingParams, limit: int) -> int:
    sem = asyncio.Semaphore(limit)
    body_sp = sampling_payload(params)

    async def one(session: aiohttp.ClientSession, prompt: list[int]) -> int:
        body = {
            "input_ids": [prompt] * params.n,
            "sampling_params": body_sp,
            "return_logprob": True,
        }
        async with sem, session.post(url + "/generate", json=body) as response:
            items = await response.json()
        return sum(len(item["output_ids"]) for item in items)

    async with aiohttp.ClientSession() as session:
        counts = await asyncio.gather(*(one(session, p) for p in prompts))
    return sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [
        [rng.randrange(256) for _ in range(rng.randrange(8, 40))] for _ in range(args.prompts)
    ]
    # Same prompts and sampling on both paths; throughput counts the tokens actually generated.
    params = SamplingParams(n=args.n, max_new_tokens=args.tokens, temperature=1.0)
    with tempfile.TemporaryDirectory(prefix="hpt_client_bench_") as tmp:
        build_tiny_model(Path(tmp) / "model")
        cfg = SGLangConfig(
            device="cpu",
            dtype="float32",
            max_total_tokens=65536,
            extra_args=["--skip-server-warmup"],
            startup_timeout_s=900,
        )
        with SGLangEngine.launch(cfg, model_path=Path(tmp) / "model", run_dir=tmp) as engine:
            engine.generate(prompts[:4], params)  # warm-up
            url, limit = engine.servers[0].url, cfg.max_concurrency
            rates: dict[str, list[float]] = {"engine": [], "direct": []}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                gens = engine.generate(prompts, params)
                rates["engine"].append(
                    sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t0)
                )
                t0 = time.perf_counter()
                tokens = asyncio.run(_direct(url, prompts, params, limit))
                rates["direct"].append(tokens / (time.perf_counter() - t0))
    engine_tps, direct_tps = (statistics.median(rates[k]) for k in ("engine", "direct"))
    print(
        json.dumps(
            {
                "requests": args.prompts,
                "samples_per_request": args.n,
                "new_tokens": args.tokens,
                "engine_tokens_per_s": round(engine_tps, 1),
                "direct_tokens_per_s": round(direct_tps, 1),
                "client_overhead_pct": round(100 * (direct_tps / engine_tps - 1), 2),
                "runs": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
