"""``rollout.sglang.urls`` and ``rollout.sglang.router`` on two real CPU SGLang servers.

The module starts the two servers once, through an engine that also starts sglang-router over
them (``launched``). The external-server tests connect a second engine to the same two URLs
(the servers are then "started by the test", not by that engine) and check that it uses both and
stops neither; the router tests use ``launched`` itself. The model is the random tiny Llama of
examples/tiny_cpu.yaml, so ``hpt train`` can sync its weights into the servers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import ServerStartError, SGLangEngine
from hpt_megatron.rollout.sglang.engine import server_counters
from hpt_megatron.rollout.sglang.server import free_port
from tests.helpers.sglang_cpu import require_sglang, server_config
from tests.helpers.tiny_hf import assert_same_hf_weights

ROOT = Path(__file__).resolve().parents[2]
# Two CPU servers start in about a minute on an idle machine, much longer on a loaded one.
pytestmark = [pytest.mark.sglang, pytest.mark.timeout(1800)]

# Arithmetic-tokenizer ids (vocab 128): distinct prompts, 12 tokens each.
PROMPTS = [[1, *[(7 * i + j) % 100 + 10 for j in range(11)]] for i in range(8)]


def _cfg(**overrides: object) -> SGLangConfig:
    return server_config(8192, **overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random initial model ``hpt train examples/tiny_cpu.yaml`` would serve."""
    from hpt_megatron.config.schema import load_config
    from hpt_megatron.data.tokenizer import load_tokenizer
    from hpt_megatron.orchestration.loop import resolve_model_config
    from hpt_megatron.rollout.sglang.build import _write_init_model

    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = load_config(ROOT / "examples" / "tiny_cpu.yaml")
    torch.manual_seed(0)
    _write_init_model(resolve_model_config(cfg), load_tokenizer("arithmetic", path), path)
    return path


@pytest.fixture(scope="module")
def launched(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    require_sglang()
    run_dir = tmp_path_factory.mktemp("launched")
    eng = SGLangEngine.launch(
        _cfg(servers_per_node=2, router=True), model_path=model_dir, run_dir=run_dir
    )
    yield eng
    eng.shutdown()
    assert not any(s.is_alive() for s in eng.servers) and not eng.router.is_alive()


def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _generate_counts(servers) -> list[float]:
    counts = [server_counters(s) for s in servers]
    assert all(c is not None for c in counts), "servers launched behind the router export metrics"
    return [c[0] for c in counts]  # type: ignore[index]


def test_external_servers_are_used_and_left_running(
    launched: SGLangEngine, model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    urls = [s.url for s in launched.servers]
    eng = SGLangEngine.connect(_cfg(urls=urls, router=False), run_dir=tmp_path)
    assert eng.router is None and [s.url for s in eng.servers] == urls
    before = _generate_counts(launched.servers)
    gens = eng.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3))
    assert len(gens) == 2 * len(PROMPTS)
    counts = eng.server_metrics()
    assert counts["rollout/requests/server_0"] > 0 and counts["rollout/requests/server_1"] > 0
    assert counts["rollout/requests/server_0"] + counts["rollout/requests/server_1"] == 8
    after = _generate_counts(launched.servers)  # the servers' own counts agree
    assert [a - b for a, b in zip(after, before)] == [
        counts["rollout/requests/server_0"],
        counts["rollout/requests/server_1"],
    ]
    # New weights by disk reach both servers: greedy outputs follow them on every prompt.
    new = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    eng.update_weights([list(new.state_dict().items())], version=2)
    assert (tmp_path / "rollout_weights" / "v2").is_dir()
    gens = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    for prompt, gen in zip(PROMPTS, gens):
        assert gen.token_ids == _greedy(new, prompt, 6)[: len(gen.token_ids)]
        assert gen.weight_version == 2
    eng.shutdown()
    assert all(s.health() for s in launched.servers)  # neither was stopped
    launched.update_weights_from_disk(model_dir, version=0)  # back to the module's weights


def test_unreachable_url_is_a_clear_error(launched: SGLangEngine, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = _cfg(urls=[launched.servers[0].url, dead], router=False)
    with pytest.raises(ServerStartError, match=f"rollout.sglang.urls: .*{dead}.*cannot connect"):
        SGLangEngine.connect(cfg, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"urls\[0\]: 'localhost' must be http"):
        _cfg(urls=["localhost"])


def test_hpt_eval_on_external_servers(
    launched: SGLangEngine, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from hpt_megatron.eval.cli import main

    bench = tmp_path / "arith.jsonl"
    bench.write_text(
        "\n".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(3))
    )
    argv = ["--model", str(model_dir), "--engine", "sglang"]
    argv += ["--urls", *[s.url for s in launched.servers], "--benchmarks", str(bench)]
    argv += ["--k", "2", "--max-new-tokens", "4", "--system-prompt", "none", "--pass-k", "1,2"]
    argv += ["--template", "raw", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    header = ["benchmark", "problems", "k", "avg@k", "pass@1", "pass@2"]
    assert capsys.readouterr().out.splitlines()[0].split() == header
    assert len((tmp_path / "out/responses.jsonl").read_text().splitlines()) == 6
    assert (tmp_path / "out/summary.json").is_file()
    assert all(s.health() for s in launched.servers)


def test_hpt_eval_launches_its_own_server(
    launched: SGLangEngine, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``hpt eval --engine sglang`` without ``--urls``: it starts a CPU server on ``--model``,
    evaluates on it with the same output files, and leaves no server behind."""
    from hpt_megatron.eval.cli import main

    bench = tmp_path / "arith.jsonl"
    bench.write_text(
        "\n".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(3))
    )
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--engine", "sglang", "--sglang-device", "cpu"]
    argv += ["--num-servers", "1", "--max-total-tokens", "4096", "--benchmarks", str(bench)]
    argv += ["--k", "2", "--max-new-tokens", "4", "--system-prompt", "none", "--pass-k", "1,2"]
    argv += ["--template", "raw", "--output-dir", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[:4] == [
        "benchmark",
        "problems",
        "k",
        "avg@k",
    ]
    assert len((out / "responses.jsonl").read_text().splitlines()) == 6
    log = (out / "sglang_logs" / "sglang_server_0.log").read_text()
    assert "starting:" in log
    from tests.helpers.procs import pids_with

    left = pids_with(b"sglang.launch_server", str(model_dir).encode(), b"--port")
    # The module's own two servers serve model_dir too; eval's is the one not among them.
    assert set(left) <= {s.proc.pid for s in launched.servers if s.proc}, left


@pytest.mark.slow
def test_hpt_train_on_external_servers(launched: SGLangEngine, tmp_path: Path) -> None:
    """``hpt train`` with ``rollout.sglang.urls``: both servers serve its rollouts (counted in
    the metrics), they hold the exported policy after the last step, and keep running."""
    from tests.helpers import hpt_train

    out = tmp_path / "run"
    urls = ",".join(f"'{s.url}'" for s in launched.servers)
    overrides = ["parallel.tp=1", "run.steps=2", "run.val_every=0"]
    overrides += ["data.prompts_per_step=4", "rollout.n=2", "logging.progress_bar=false"]
    overrides += [
        "rollout.engine=sglang",
        f"rollout.sglang.urls=[{urls}]",
        "rollout.sglang.router=false",
    ]
    overrides += ["rollout.sglang.device=cpu"]  # where the servers run: no GPU memory to release
    hpt_train.run(hpt_train.TINY, out, *overrides, nproc=1, timeout=900)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/requests/server_0"] > 0 and rows[-1]["rollout/requests/server_1"] > 0
    assert all(s.health() for s in launched.servers)  # the run stopped neither
    assert_same_hf_weights(out / "rollout_weights" / "v2", out / "hf")


def test_router_keeps_a_prompts_samples_on_one_server(launched: SGLangEngine) -> None:
    """Seeded samples go through the router as one request each: the prompt's routing key
    sends the n requests of a prompt to one server, and the repeats find the prompt cached."""
    assert launched.router is not None
    n = 4
    for rep in range(2):
        for prompt in PROMPTS[:4]:
            before = _generate_counts(launched.servers)
            gens = launched.generate(
                [prompt], SamplingParams(n=n, temperature=1.0, max_new_tokens=4, seed=rep)
            )
            assert len(gens) == n
            delta = [a - b for a, b in zip(_generate_counts(launched.servers), before)]
            assert sorted(delta) == [0, n], delta
    counts = launched.server_metrics()
    assert counts["rollout/requests/router"] >= 2 * 4 * n
    assert counts["rollout/cached_prompt_tokens"] > 0  # prefix-cache hits, from meta_info


def test_router_is_told_when_a_worker_restarts(launched: SGLangEngine) -> None:
    victim = launched.servers[1]
    killed = victim.proc
    os.killpg(killed.pid, signal.SIGKILL)
    # Reaped when it has gone (a large process can take seconds to exit on a loaded machine).
    assert killed.wait(timeout=120) == -signal.SIGKILL
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=5)
    deadline = time.monotonic() + 600
    # Requests fail over to the other server meanwhile; "up" once restarted, re-synced and
    # re-registered with the router.
    while launched.pool.state[1] != "up" or victim.restarts == 0:
        launched.generate(PROMPTS[:2], params)
        assert time.monotonic() < deadline
        time.sleep(2)
    assert victim.is_alive()
    for _ in range(60):  # the engine re-registers it with the router after the restart
        with urllib.request.urlopen(f"{launched.router.url}/workers", timeout=10) as response:
            workers = json.loads(response.read())["workers"]
        if {w["url"] for w in workers if w["is_healthy"]} == {s.url for s in launched.servers}:
            break
        time.sleep(1)
    else:
        pytest.fail(f"router workers after the restart: {workers}")
    before = _generate_counts(launched.servers)
    launched.generate(PROMPTS[4:], params)  # new prefixes: the emptier tree, the new server's
    after = _generate_counts(launched.servers)
    assert after[1] > before[1], (before, after)
    assert launched.restarts == 1


def test_refused_groups_and_payloads_are_named_and_take_no_server_down(
    launched: SGLangEngine,
) -> None:
    """Bad input to ``weight_sync: distributed`` and ``tensor`` on a real server: a server that
    is not there, a group name the server already holds, a tensor payload outside a weight
    update session, and a payload SGLang would die unpickling. Each is a clear error naming
    the server (and the tensors), and the server goes on serving."""
    from multiprocessing.reduction import ForkingPickler

    from hpt_megatron.rollout.weight_sync.distributed import SyncError, Target, UpdateGroup, post
    from hpt_megatron.rollout.weight_sync.tensor import check_payload, send

    server = launched.servers[0]
    target = Target(0, server.url, server.auth_headers())
    wrong = Target(0, f"http://127.0.0.1:{free_port()}", {})
    with pytest.raises(SyncError, match=rf"{wrong.url} does not answer /health"):
        UpdateGroup("hpt-test-nobody", [wrong], "gloo", 30.0).join()
    group = UpdateGroup("hpt-test-taken", [target], "gloo", 300.0)
    group.join()
    group.destroy()  # this side only: the server still holds the name
    started = time.monotonic()
    taken = rf"{server.url}/init_weights_update_group answered 400: .* name has already been"
    with pytest.raises(SyncError, match=taken):
        UpdateGroup("hpt-test-taken", [target], "gloo", 10.0).join()
    assert time.monotonic() - started < 120
    post(target, "/destroy_weights_update_group", {"group_name": "hpt-test-taken"}, 60.0)
    norm = [("model.norm.weight", torch.ones(64))]
    outside = rf"tensor\) of model.norm.weight: {server.url}/update_weights_from_tensor .*begin"
    with pytest.raises(SyncError, match=outside):
        send([target], norm, 1, 60.0)  # no /begin_weight_update: SGLang refuses it
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(norm)  # torch's default CPU sharing: SGLang would go down
    with pytest.raises(ValueError, match="payload of model.norm.weight would make the server"):
        check_payload(buffer.getvalue(), ["model.norm.weight"])
    assert launched.health()
    gens = launched.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2, temperature=0.0))
    assert gens[0].token_ids  # it still generates
