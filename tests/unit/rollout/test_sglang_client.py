"""Server management and the client against a fake SGLang server (no SGLang needed)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.base import SamplingParams
from hpt_megatron.rollout.sglang import ServerStartError, SGLangEngine, launch_servers
from hpt_megatron.rollout.sglang.protocol import parse_generation
from hpt_megatron.rollout.sglang.server import free_port, hold_port, port_listeners
from tests.helpers.fake_servers import FAKE, fake_config


def _cfg(**overrides: object) -> SGLangConfig:
    return fake_config(**overrides)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _engine(cfg: SGLangConfig, model_dir: Path, run_dir: Path) -> SGLangEngine:
    return SGLangEngine.launch(cfg, model_path=model_dir, run_dir=run_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone; so does one reaped
    # between the signal above and this read.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def _stats(engine: SGLangEngine, i: int) -> dict:
    server = engine.servers[i]
    request = urllib.request.Request(server.url + "/stats", headers=server.auth_headers())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_generate_groups_by_prompt_and_balances(model_dir: Path, tmp_path: Path) -> None:
    with _engine(_cfg(servers_per_node=2), model_dir, tmp_path) as engine:
        prompts = [[i, i + 1] for i in range(10)]
        gens = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=4, seed=0))
        assert [g.prompt_index for g in gens] == [i for i in range(10) for _ in range(3)]
        assert gens[3].token_ids == [(3 + k) % 100 for k in range(4)]
        assert gens[0].logprobs == [-0.25] * 4 and gens[0].finish_reason == "length"
        calls = [_stats(engine, i)["generate_calls"] for i in range(2)]
        assert sum(calls) == 10 and min(calls) >= 3  # both servers got work
        log = (tmp_path / "sglang_logs" / "sglang_server_1.log").read_text()
        assert "starting:" in log


def test_api_key_is_sent(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPT_TEST_KEY", "s3cret")
    with _engine(_cfg(api_key_env="HPT_TEST_KEY"), model_dir, tmp_path) as engine:
        server = engine.servers[0]
        assert server.launch.api_key == "s3cret" and "s3cret" not in server.launch.args
        assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].token_ids == [1, 2]
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline and b"HPT_TEST_KEY" not in cmdline
    # The server logs its arguments, the key among them: the log has it blanked.
    log = (tmp_path / "sglang_logs" / "sglang_server_0.log").read_text()
    assert "server_args=" in log and "'api_key': '<api-key>'" in log and "s3cret" not in log
    monkeypatch.delenv("HPT_TEST_KEY")
    with pytest.raises(ValueError, match="HPT_TEST_KEY is unset"):
        _engine(_cfg(api_key_env="HPT_TEST_KEY"), model_dir, tmp_path)


def test_a_non_loopback_server_gets_a_generated_key(tmp_path: Path) -> None:
    from hpt_megatron.rollout.sglang.launch import server_api_key

    cfg = _cfg()
    assert server_api_key(cfg, "127.0.0.1") is None and server_api_key(cfg, "localhost") is None
    key = server_api_key(cfg, "10.1.2.3")
    assert key and len(key) >= 32 and key != server_api_key(cfg, "10.1.2.3")
    assert server_api_key(cfg, "0.0.0.0", generated="g") == "g"


def test_weight_version_recorded_and_restart_resyncs(model_dir: Path, tmp_path: Path) -> None:
    import torch

    with _engine(_cfg(), model_dir, tmp_path) as engine:
        engine.update_weights([[("w", torch.ones(2))]], version=4)
        assert engine.generate([[1]], SamplingParams(max_new_tokens=2))[0].weight_version == 4
        snapshot = tmp_path / "rollout_weights" / "v4"
        assert (snapshot / "bucket-00000.safetensors").is_file()
        os.killpg(engine.servers[0].proc.pid, signal.SIGKILL)
        gens = engine.generate([[1], [2]], SamplingParams(max_new_tokens=2))
        assert engine.servers[0].restarts == 1
        assert [g.weight_version for g in gens] == [4, 4]  # re-loaded after the restart


def test_a_server_dead_at_a_weight_load_gets_the_weights_after_its_restart(
    model_dir: Path, tmp_path: Path
) -> None:
    """The load goes on with the servers that are up; the dead one is restarted and loads the
    newest folder then, and before it generates again it reports that version."""
    import torch

    with _engine(_cfg(servers_per_node=2), model_dir, tmp_path) as engine:
        engine.update_weights([[("w", torch.ones(2))]], version=1)
        os.killpg(engine.servers[1].proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        engine.update_weights([[("w", torch.full((2,), 2.0))]], version=2)  # no error
        deadline = time.monotonic() + 30
        while engine.pool.state[1] != "up":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert engine.servers[1].restarts == 1
        assert [_stats(engine, i)["version"] for i in range(2)] == ["2", "2"]
        for server in engine.servers:
            os.killpg(server.proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(RuntimeError, match="every server is down"):
            engine.update_weights_from_disk(tmp_path / "rollout_weights" / "v2", 3)


def test_a_server_dying_between_its_load_and_the_check_is_checked_after_its_restart(
    model_dir: Path, tmp_path: Path
) -> None:
    """``check_weights`` reads the weights back after a load; a server that dies before it
    answers (CI's two-node run: node 1's server killed mid-sync) is left to the pool like one dead
    at the load: the run goes on, and the restarted server is loaded and checked then."""
    import torch

    died = tmp_path / "died"
    env = {"PYTHONPATH": str(FAKE), "FAKE_SGLANG_DIE_ON_READ": str(died)}
    with _engine(_cfg(servers_per_node=2, check_weights=True, env=env), model_dir, tmp_path) as e:
        e.update_weights([[("w", torch.arange(4.0))]], version=1)  # no error
        assert died.exists() and e.checked_tensors == 1
        deadline = time.monotonic() + 30
        while e.pool.state != ["up", "up"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert sum(server.restarts for server in e.servers) == 1
        assert [_stats(e, i)["version"] for i in range(2)] == ["1", "1"]


def test_a_server_restarted_unseen_is_resynced_before_it_generates(
    model_dir: Path, tmp_path: Path
) -> None:
    """A server that came back between two batches (its node restarted it) reports its start
    weights (``weight_version`` "default"): the engine loads the current ones before generating."""
    import torch

    with _engine(_cfg(), model_dir, tmp_path) as engine:
        engine.update_weights([[("w", torch.ones(2))]], version=3)
        engine.servers[0].restart()  # as a node's supervisor does: the pool never saw it
        assert _stats(engine, 0)["version"] == "default"
        gens = engine.generate([[1]], SamplingParams(max_new_tokens=2))
        assert gens[0].weight_version == 3 and _stats(engine, 0)["version"] == "3"
        assert engine.stale_resyncs == 1 and engine.restarts == 2  # its own restart + this


def test_a_restarted_server_is_re_registered_with_the_router(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the resync of a restarted server the router is told to route to it again (the real
    router's half is in tests/sglang/test_external_servers_router.py)."""
    import torch

    from hpt_megatron.rollout.sglang import engine as engine_module

    told: list[str] = []

    async def tell_restarted(session, router, url, api_key) -> None:  # noqa: ANN001
        told.append(url)

    monkeypatch.setattr(engine_module, "tell_router_restarted", tell_restarted)
    with _engine(_cfg(), model_dir, tmp_path) as engine:
        engine.update_weights([[("w", torch.ones(2))]], version=1)
        engine.servers[0].restart()
        engine.router = type(
            "Router", (), {"is_alive": lambda self: True, "stop": lambda self: None}
        )()
        engine._loop.run(engine._after_restart(0))
        assert told == [engine.servers[0].url]
        assert _stats(engine, 0)["version"] == "1"


def test_lost_requests_are_resent_after_a_crash(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(servers_per_node=2, env={"PYTHONPATH": str(FAKE), "FAKE_SGLANG_DELAY": "0.5"})
    with _engine(cfg, model_dir, tmp_path) as engine:
        victim = engine.servers[1]
        killer = threading.Timer(0.25, lambda: os.killpg(victim.proc.pid, signal.SIGKILL))
        killer.start()
        prompts = [[i] for i in range(12)]
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=3))
        killer.join()
        assert [g.token_ids[0] for g in gens] == list(range(12))
        assert victim.restarts == 1 and engine.health()


def test_restarts_are_bounded(model_dir: Path, tmp_path: Path) -> None:
    with _engine(_cfg(max_restarts=0, max_retries=1), model_dir, tmp_path) as engine:
        os.killpg(engine.servers[0].proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="every SGLang server failed|attempts"):
            engine.generate([[1]], SamplingParams(max_new_tokens=2))


def test_shutdown_stops_the_whole_process_group(model_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    cfg = _cfg(env={"PYTHONPATH": str(FAKE), "FAKE_SGLANG_PIDS": str(pid_file)})
    engine = _engine(cfg, model_dir, tmp_path)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    engine.shutdown()
    assert _wait_gone(pids)


def test_servers_die_with_a_killed_parent(model_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parents[3])!r})
from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.sglang import launch_servers
cfg = SGLangConfig(python=sys.executable, device="cpu", startup_timeout_s=30,
                   env={{"PYTHONPATH": {str(FAKE)!r}, "FAKE_SGLANG_PIDS": {str(pid_file)!r}}})
launch_servers(cfg, model_path={str(model_dir)!r}, log_dir={str(tmp_path)!r}, api_key=None)
print("up", flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        pids = [int(p) for p in pid_file.read_text().split()]
        parent.send_signal(signal.SIGKILL)  # no atexit, no handlers: only the watchdog helps
        parent.wait()
        assert _wait_gone(pids), "the server outlived its SIGKILLed parent"
    finally:
        parent.kill()


def test_sigterm_to_parent_stops_servers(model_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parents[3])!r})
from hpt_megatron.config.rollout import SGLangConfig
from hpt_megatron.rollout.sglang import launch_servers
cfg = SGLangConfig(python=sys.executable, device="cpu", startup_timeout_s=30,
                   env={{"PYTHONPATH": {str(FAKE)!r}, "FAKE_SGLANG_PIDS": {str(pid_file)!r}}})
launch_servers(cfg, model_path={str(model_dir)!r}, log_dir={str(tmp_path)!r}, api_key=None)
print("up", flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        pids = [int(p) for p in pid_file.read_text().split()]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == -signal.SIGTERM
        assert _wait_gone(pids, timeout_s=5)  # stopped by the handler, not the watchdog
    finally:
        parent.kill()


def test_startup_failure_quotes_the_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ServerStartError, match="no config.json in") as err:
        launch_servers(_cfg(), model_path=empty, log_dir=tmp_path, api_key=None)
    assert "exited with code 3" in str(err.value)


def test_a_taken_port_moves_only_when_it_was_picked_here(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process listens on the port picked for a server (it took it after ``free_port``):
    the server moves to a free one; on a port the user gave (``base_port``) it is an error."""

    from hpt_megatron.rollout.sglang import launch as engine_module

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        monkeypatch.setattr(engine_module, "free_port", lambda host: taken)
        servers = launch_servers(_cfg(), model_path=model_dir, log_dir=tmp_path, api_key=None)
        try:
            assert servers[0].launch.port != taken and servers[0].health()
            assert f"--port {servers[0].launch.port}" in " ".join(servers[0].launch.args)
        finally:
            servers[0].stop()
        with pytest.raises(ServerStartError, match="port is taken by another process"):
            launch_servers(
                _cfg(base_port=taken), model_path=model_dir, log_dir=tmp_path, api_key=None
            )


def test_a_restart_waits_for_the_killed_server_to_free_its_port(
    model_dir: Path, tmp_path: Path
) -> None:
    """A killed server's processes can hold its port a while (slow exits on a loaded machine);
    the restart keeps the URL, so it waits for the port instead of failing with it taken."""

    server = launch_servers(_cfg(), model_path=model_dir, log_dir=tmp_path, api_key=None)[0]
    port = server.launch.port
    server.stop()
    lingering = socket.socket()  # the old server's last process, still exiting
    lingering.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lingering.bind(("127.0.0.1", port))
    lingering.listen()
    threading.Timer(1.5, lingering.close).start()
    try:
        server.restart()
        assert server.launch.port == port and server.health() and server.restarts == 1
    finally:
        server.stop()
        lingering.close()


def test_a_held_port_is_refused_to_others_and_open_to_its_server() -> None:
    """``hold_port``: while held, a plain bind of the port fails (so does the kernel's choice of
    a free port, by the same rule); a server binding it with SO_REUSEADDR, as uvicorn does, can
    bind and listen; once released, anyone can bind it."""
    hold = hold_port("127.0.0.1", free_port())
    assert hold is not None
    port = hold.getsockname()[1]
    try:
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))
        with socket.socket() as own:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.bind(("127.0.0.1", port))
            own.listen()
            assert port_listeners(port)
            assert hold_port("127.0.0.1", port) is None  # a listener: nothing else holds it
    finally:
        hold.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))


def test_a_dead_servers_port_stays_held_until_its_restart_binds_it(
    model_dir: Path, tmp_path: Path
) -> None:
    """Between a server's death and its replacement's bind (minutes of start-up on CPU), its port
    stays held: the loaded-suite failure where another process took a restarting server's freed
    port. The final stop releases it."""
    server = launch_servers(_cfg(), model_path=model_dir, log_dir=tmp_path, api_key=None)[0]
    port = server.launch.port
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)  # it crashes
    server.proc.wait(timeout=10)
    try:
        assert not port_listeners(port)
        hold = server._port_hold
        assert hold is not None and hold.getsockname()[1] == port
        server.restart()
        assert server.launch.port == port and server.health() and server.restarts == 1
        assert server._port_hold is hold  # held through the restart, not re-taken
    finally:
        server.stop()
    assert server._port_hold is None and hold.fileno() == -1


def test_startup_timeout(model_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(env={"PYTHONPATH": str(FAKE)}, startup_timeout_s=0.01)
    with pytest.raises(ServerStartError, match="not healthy after"):
        launch_servers(cfg, model_path=model_dir, log_dir=tmp_path, api_key=None)


def test_parse_generation_maps_finish_reasons() -> None:
    item = {
        "output_ids": [5, 6],
        "meta_info": {
            "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]],
            "finish_reason": {"type": "abort", "message": "x"},
            "weight_version": "default",
        },
    }
    gen = parse_generation(item, 2, weight_version=9)
    assert (gen.prompt_index, gen.finish_reason, gen.weight_version) == (2, "abort", 9)
    assert gen.logprobs == [-1.0, -2.0]
    item["meta_info"]["output_token_logprobs"] = [[-1.0, 5, None]]
    with pytest.raises(RuntimeError, match="1 log-probs for 2 tokens"):
        parse_generation(item, 0, weight_version=0)


def test_parse_generation_decodes_routed_experts() -> None:
    # SGLang's layout: int32 [prompt + output - 1, layers, top_k], base64 (a real answer's,
    # tests/sglang/test_moe_sglang.py checks the ids against HF's routers)
    ids = torch.arange(4 * 3 * 2, dtype=torch.int32).remainder(8).view(4, 3, 2)
    item = {
        "output_ids": [5, 6],
        "meta_info": {
            "output_token_logprobs": [[-1.0, 5, None], [-2.0, 6, None]],
            "finish_reason": {"type": "stop"},
            "routed_experts": base64.b64encode(ids.numpy().tobytes()).decode(),
        },
    }
    gen = parse_generation(item, 0, weight_version=1, prompt=[1, 2, 3], routed_top_k=2)
    assert gen.routed_experts is not None and gen.routed_experts.dtype == torch.uint8
    assert torch.equal(gen.routed_experts.long(), ids.long())
    assert parse_generation(item, 0, weight_version=1).routed_experts is None  # not asked for
    with pytest.raises(RuntimeError, match="24 ids, not a multiple of 5 tokens x top-k 2"):
        parse_generation(item, 0, weight_version=1, prompt=[1, 2, 3, 4], routed_top_k=2)
    del item["meta_info"]["routed_experts"]
    with pytest.raises(RuntimeError, match="--enable-return-routed-experts"):
        parse_generation(item, 0, weight_version=1, prompt=[1, 2, 3], routed_top_k=2)


def test_build_sglang_engine_writes_an_init_model(tmp_path: Path) -> None:
    from hpt_megatron.config.rollout import RolloutConfig
    from hpt_megatron.models.hf_config import HFModelConfig
    from hpt_megatron.rollout.sglang import build_sglang_engine
    from tests.helpers.tiny_hf import build_byte_tokenizer, tiny_config

    hf = HFModelConfig.from_dict(tiny_config().to_dict())
    cfg = RolloutConfig(engine="sglang", sglang=_cfg())
    engine = build_sglang_engine(cfg, hf=hf, tokenizer=build_byte_tokenizer(), run_dir=tmp_path)
    with engine:
        init = tmp_path / "sglang_init_model"
        assert (init / "config.json").is_file() and (init / "tokenizer.json").is_file()
        assert engine.servers[0].launch.args[1] == str(init)


def test_external_server_errors_name_the_url(tmp_path: Path) -> None:
    """``rollout.sglang.urls``: an unreachable server, or one that refuses the API key, is an
    error naming the URL when the engine is built (before step 1); nothing is launched."""
    import http.server
    import threading

    from hpt_megatron.rollout.sglang.server import ExternalServer, free_port

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = SGLangConfig(device="cpu", urls=[dead], router=False)
    with pytest.raises(ServerStartError, match=f"rollout.sglang.urls: .*{dead}.*cannot connect"):
        SGLangEngine.connect(cfg, run_dir=tmp_path)

    class Refuses(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuses)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(ServerStartError, match=f"{url}.*401.*api_key_env"):
            ExternalServer(url, api_key="wrong").check()
    finally:
        httpd.shutdown()


def test_connect_uses_every_given_server_and_stops_none(model_dir: Path, tmp_path: Path) -> None:
    """``rollout.sglang.urls`` over two running (fake) servers: both serve, the weights reach
    both, and shutting the connected engine down leaves them running."""
    import torch

    with _engine(_cfg(servers_per_node=2), model_dir, tmp_path / "owner") as owner:
        urls = [s.url for s in owner.servers]
        cfg = SGLangConfig(device="cpu", urls=urls, router=False, request_timeout_s=30)
        user = SGLangEngine.connect(cfg, run_dir=tmp_path / "run")
        assert [s.url for s in user.servers] == urls and user.router is None
        user.update_weights([[("w", torch.ones(2))]], version=2)
        user.generate([[i] for i in range(8)], SamplingParams(max_new_tokens=2))
        assert all(_stats(owner, i)["generate_calls"] > 0 for i in range(2))
        assert [_stats(owner, i)["version"] for i in range(2)] == ["2", "2"]
        user.shutdown()
        assert owner.health()  # the user's servers keep running


def test_scoring_request_and_answer() -> None:
    """Teacher scoring: the response's tokens from the prompt's last one, whose entry (None) is
    dropped; an answer for other tokens is an error naming the sequence."""
    from hpt_megatron.rollout.sglang.scoring import parse_scores, score_payload

    payload = score_payload([[1, 2], [3]], [[4, 5], [6]])
    assert payload["input_ids"] == [[1, 2, 4, 5], [3, 6]]
    assert payload["logprob_start_len"] == [1, 0] and payload["return_logprob"] is True
    assert payload["sampling_params"]["max_new_tokens"] == 0
    answer = [
        {"meta_info": {"input_token_logprobs": [[None, 2, ""], [-0.5, 4, ""], [-1.5, 5, ""]]}},
        {"meta_info": {"input_token_logprobs": [[None, 3, ""], [-2.0, 6, ""]]}},
    ]
    assert parse_scores(answer, [[4, 5], [6]]) == [[-0.5, -1.5], [-2.0]]
    with pytest.raises(RuntimeError, match="sequence 1: SGLang returned log-probs for tokens"):
        parse_scores(answer, [[4, 5], [7]])
    with pytest.raises(ValueError, match="sequence 0: scoring needs a non-empty"):
        score_payload([[1]], [[]])


def test_a_teacher_server_that_dies_is_retried_then_a_clear_error(
    model_dir: Path, tmp_path: Path
) -> None:
    """``algorithm.teacher.urls`` over two (fake) servers: with one killed, its scoring requests
    go to the other and every row is scored as before; with both killed, scoring fails once
    ``algorithm.teacher.timeout_s`` has passed, naming the teacher's key and a URL."""
    from hpt_megatron.config import load_config
    from hpt_megatron.rollout.factory import build_teacher_engine

    tiny = Path(__file__).resolve().parents[3] / "examples" / "tiny_cpu.yaml"
    with _engine(_cfg(servers_per_node=2), model_dir, tmp_path / "owner") as owner:
        urls = [s.url for s in owner.servers]
        overrides = [
            "algorithm.preset=opd",
            f"algorithm.teacher.urls=[{','.join(urls)}]",
            "algorithm.teacher.timeout_s=3",
        ]
        cfg = load_config(str(tiny), overrides)
        teacher = build_teacher_engine(None, cfg, None, tmp_path / "run")  # type: ignore[arg-type]
        assert teacher is not None
        prompts, responses = [[1, 2, i] for i in range(8)], [[4, 5, i] for i in range(8)]
        first = teacher.score(prompts, responses)  # type: ignore[attr-defined]
        assert [len(r) for r in first] == [3] * 8
        for i, server in enumerate(owner.servers):
            assert server.proc is not None
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
            if i == 0:
                assert teacher.score(prompts, responses) == first  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"algorithm\.teacher\.urls: .*did not come back"):
            teacher.score(prompts, responses)  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 60
        teacher.shutdown()
