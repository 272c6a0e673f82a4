"""sglang-router (cache-aware) against the client's own balancing, two CPU SGLang servers.

Starts two SGLang servers on CPU with the tiny model (``tests.helpers``), then alternates, to
share any drift in machine load: an engine whose client balances the requests itself (least
in flight), and an engine over the same two servers whose ``/generate`` requests go through a
sglang-router it started (``rollout.sglang.router=true``, ``cache_aware``). Both get the same
requests: ``--prompts`` prompts of a shared template prefix plus a distinct question, ``--n``
samples each (unseeded, so both send one batched request per prompt), ``--tokens`` new tokens.
The servers' prefix caches are flushed before every timed pass. Reports generation tokens/s of
each, the ratio router / client, and how the requests split over the two servers.

Usage, from the repository root:

    python -m benchmarks.router_vs_client [--prompts 64] [--n 8] [--tokens 32] [--repeats 2]

Measured 2026-12-01 on the 2 shared CPU cores (other jobs running, so noisy: the client's two
passes were 314.6 and 176.4 tokens/s): client 245.5, router 207.1 tokens/s (medians of 2),
router / client 0.84; both split the 64 requests 32/32 and found the same cached prefix tokens
(~9.3k per server), since one batched request carries all n samples of a prompt either way.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import SGLangEngine, launch_servers
from hpt_megatron.rollout.sglang.engine import server_counters
from tests.helpers.tiny_hf import build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=48, help="shared template tokens")
    parser.add_argument("--question", type=int, default=24, help="distinct tokens per prompt")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rng = random.Random(0)
    template = [rng.randrange(3, 250) for _ in range(args.prefix)]
    prompts = [
        template + [rng.randrange(3, 250) for _ in range(args.question)]
        for _ in range(args.prompts)
    ]
    params = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.tokens)
    base = dict(
        device="cpu",
        dtype="float32",
        max_total_tokens=32768,
        extra_args=["--skip-server-warmup", "--enable-metrics"],
        startup_timeout_s=900,
        request_timeout_s=900,
    )
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        model = Path(tmp) / "model"
        build_tiny_model(model)
        cfg = SGLangConfig(servers_per_node=2, router=False, **base)  # type: ignore[arg-type]
        servers = launch_servers(cfg, model_path=model, log_dir=Path(tmp) / "logs", api_key=None)
        urls = [s.url for s in servers]
        client = SGLangEngine(servers, cfg=cfg)
        routed_cfg = SGLangConfig(urls=urls, router=True, **base)  # type: ignore[arg-type]
        routed = SGLangEngine.connect(routed_cfg, run_dir=tmp)
        results: dict[str, list[float]] = {"client": [], "router": []}
        split: dict[str, list[float]] = {}
        try:
            client.generate(prompts[:2], params)  # first-request costs out of the timing
            routed.generate(prompts[2:4], params)
            for _ in range(args.repeats):
                for name, engine in (("router", routed), ("client", client)):
                    client.flush_cache()
                    before = [server_counters(s) or (0.0, 0.0) for s in servers]
                    t0 = time.perf_counter()
                    gens = engine.generate(prompts, params)
                    elapsed = time.perf_counter() - t0
                    after = [server_counters(s) or (0.0, 0.0) for s in servers]
                    tokens = sum(len(g.token_ids) for g in gens)
                    results[name].append(tokens / elapsed)
                    split[name] = [a[0] - b[0] for a, b in zip(after, before)]
                    split[name + "_cached_tokens"] = [a[1] - b[1] for a, b in zip(after, before)]
        finally:
            routed.shutdown()  # stops the router only: the servers are the client engine's
            client.shutdown()
    client_tps = statistics.median(results["client"])
    router_tps = statistics.median(results["router"])
    report = {
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.tokens,
        "client_tokens_per_s": round(client_tps, 1),
        "router_tokens_per_s": round(router_tps, 1),
        "router_over_client": round(router_tps / client_tps, 3),
        "runs": {k: [round(v, 1) for v in vs] for k, vs in results.items()},
        "requests_per_server_last_pass": split,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
