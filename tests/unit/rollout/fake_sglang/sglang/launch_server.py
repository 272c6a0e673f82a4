"""A fake ``sglang.launch_server`` for unit tests of server management and the client.

Speaks the few HTTP endpoints the engine uses, with deterministic outputs; starts one idle
worker child (as SGLang starts its scheduler) so tests can check that the process group goes away.
Knobs: ``FAKE_SGLANG_DELAY`` (seconds per /generate), ``FAKE_SGLANG_PIDS`` (file that gets the
server's and its worker's pids) and ``FAKE_SGLANG_DIE_ON_READ`` (a path: the first server to be
asked ``/get_weights_by_name`` creates it and dies there, with its worker, as if killed; the
connection drops half a second before the process goes, the window a killed process leaves
between closing its sockets and being reaped, made wide).

Weight sync over a process group (``weight_sync: distributed``) as SGLang 0.5.23 does it on CPU:
``/init_weights_update_group`` joins a gloo group built like SGLang's
``init_custom_process_group``, and ``/update_weights_from_distributed`` (only between
``/begin_weight_update`` and ``/end_weight_update``) receives the broadcast tensors, which
``/get_weights_by_name`` then returns, rounded to the precision the server runs in
(``--dtype``; ``auto`` runs a float32 model in float16, as SGLang does).
``/update_weights_from_tensor`` (``weight_sync: tensor``) unpickles its payload as SGLang does:
the tensors map the sender's shared memory; a payload that fails to unpickle takes the server
down, as it takes SGLang 0.5.23's.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model-path", required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--api-key", default=None)
parser.add_argument("--dtype", default="auto")
args, _ = parser.parse_known_args()
print(f"server_args={vars(args)}", flush=True)  # as SGLang logs its own, the API key among them

if not os.path.isfile(os.path.join(args.model_path, "config.json")):
    print(f"ValueError: no config.json in {args.model_path}", flush=True)
    sys.exit(3)

worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
if os.environ.get("FAKE_SGLANG_PIDS"):
    with open(os.environ["FAKE_SGLANG_PIDS"], "a") as fh:
        fh.write(f"{os.getpid()} {worker.pid}\n")
STATE = {"version": "default", "generate_calls": 0, "model_path": args.model_path}
with open(os.path.join(args.model_path, "config.json")) as fh:
    _config = json.load(fh)
# SGLang's _get_and_verify_dtype: ``auto`` serves a float32 model (or one that names no dtype)
# in float16, any other in its own dtype.
_own = _config.get("dtype") or _config.get("torch_dtype") or "float32"
SERVED = args.dtype if args.dtype != "auto" else ("float16" if _own == "float32" else _own)
LOCK = threading.Lock()
DELAY = float(os.environ.get("FAKE_SGLANG_DELAY", "0"))


def _one(ids, sp, logprob_start=None):
    n = sp.get("max_new_tokens", 4)
    out = [(sum(ids) + k) % 100 for k in range(n)]
    meta = {
        "output_token_logprobs": [[-0.25, t, None] for t in out],
        "finish_reason": {"type": "length", "length": n},
        "weight_version": STATE["version"],
    }
    if logprob_start is not None:  # scoring (a teacher): log-probs of the input from there on
        meta["input_token_logprobs"] = [
            [None if k == logprob_start else -0.01 * (t % 7 + 1), t, None]
            for k, t in enumerate(ids)
            if k >= logprob_start
        ]
    return {"output_ids": out, "meta_info": meta}


def _die_on_read(connection):
    """Drop ``connection``, then die with the worker (``FAKE_SGLANG_DIE_ON_READ``), once."""
    die = os.environ.get("FAKE_SGLANG_DIE_ON_READ")
    if die:
        try:
            os.close(os.open(die, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        connection.shutdown(socket.SHUT_RDWR)
        time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)


GROUPS = {}  # name -> the process group joined by /init_weights_update_group
RECEIVED = {}  # name -> tensor, from /update_weights_from_distributed


def _join(body):
    """SGLang's ``init_custom_process_group``: a TCP store client, a PrefixStore named after the
    group, a new process group on it."""
    name, size = body["group_name"], body["world_size"]
    if name in GROUPS:
        return {"success": False, "message": f"The specified group name {name} already exists"}
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    url = f"tcp://{body['master_address']}:{body['master_port']}"
    try:
        store, rank, _ = next(
            rendezvous(url, body["rank_offset"], size, timeout=timedelta(seconds=30))
        )
        store.set_timeout(timedelta(seconds=30))
        group, _ = _new_process_group_helper(
            size,
            rank,
            [],
            Backend(body.get("backend", "nccl")),
            PrefixStore(name, store),
            group_name=name,
            timeout=timedelta(seconds=30),
        )
        _world.pg_group_ranks[group] = {i: i for i in range(size)}
    except Exception as err:
        return {"success": False, "message": f"Failed to initialize custom process group: {err}."}
    GROUPS[name] = group
    return {"success": True, "message": "ok"}


def _receive(body):
    import torch
    import torch.distributed as dist

    if not STATE.get("session"):
        return {"success": False, "message": "must run between begin and end_weight_update"}
    group = GROUPS.get(body["group_name"])
    if group is None:
        return {"success": False, "message": f"Group {body['group_name']} not in {list(GROUPS)}"}
    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensor, group_src=0, group=group)
        RECEIVED[name] = tensor.to(getattr(torch, SERVED))  # the server's parameter
    STATE["version"] = body.get("weight_version") or STATE["version"]
    return {"success": True, "message": "ok"}


def _receive_tensors(body):
    import base64
    import pickle

    import torch

    if not STATE.get("session"):
        return {"success": False, "message": "must run between begin and end_weight_update"}
    try:
        named = pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
    except Exception as err:  # SGLang's scheduler dies on it, and the server with it
        print(f"unpickling the payload failed: {err!r}", flush=True)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    for name, tensor in named:
        RECEIVED[name] = tensor.to(getattr(torch, SERVED)).clone()  # the server's parameter
    STATE["version"] = body.get("weight_version") or STATE["version"]
    return {"success": True, "message": "ok"}


def _destroy(body):
    import torch.distributed as dist

    group = GROUPS.pop(body["group_name"], None)
    if group is None:
        return {"success": False, "message": "The group to be destroyed does not exist."}
    dist.destroy_process_group(group)
    return {"success": True, "message": "ok"}


def _session(open_it):
    if bool(STATE.get("session")) == open_it:
        return {"success": False, "message": "a weight-update session is already open or closed"}
    STATE["session"] = open_it
    return {"success": True, "message": "Success"}


def _read_weight(name, rows):
    """The tensor ``name`` last received, or of the folder loaded last, as nested lists of its
    first ``rows``."""
    from safetensors.torch import load_file

    if name in RECEIVED:
        return 200, RECEIVED[name][:rows].tolist()

    for shard in sorted(os.listdir(STATE["model_path"])):
        if shard.endswith(".safetensors"):
            tensors = load_file(os.path.join(STATE["model_path"], shard))
            if name in tensors:
                return 200, tensors[name][:rows].tolist()
    return 400, {"error": f"no tensor {name}"}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
            self._send(401, {"error": "bad api key"})
            return False
        return True

    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/stats":
            self._send(200, STATE)
        elif self.path == "/model_info":
            self._send(200, {"weight_version": STATE["version"], "groups": sorted(GROUPS)})
        else:
            self._send(404, {})

    def do_POST(self):
        if not self._authorized():
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/generate":
            with LOCK:
                STATE["generate_calls"] += 1
            time.sleep(DELAY)
            ids, sp = body["input_ids"], body["sampling_params"]
            start = body.get("logprob_start_len") if body.get("return_logprob") else None
            if ids and isinstance(ids[0], list):
                sps = sp if isinstance(sp, list) else [sp] * len(ids)
                starts = start if isinstance(start, list) else [start] * len(ids)
                self._send(200, [_one(i, s, b) for i, s, b in zip(ids, sps, starts)])
            else:
                self._send(200, _one(ids, sp, start))
        elif self.path == "/update_weights_from_disk":
            STATE["version"] = body.get("weight_version") or "default"
            STATE["model_path"] = body["model_path"]
            self._send(200, {"success": True, "message": "ok"})
        elif self.path == "/get_weights_by_name":
            _die_on_read(self.connection)
            self._send(*_read_weight(body["name"], body.get("truncate_size", 100)))
        elif self.path == "/init_weights_update_group":
            self._send(200, _join(body))
        elif self.path == "/update_weights_from_distributed":
            self._send(200, _receive(body))
        elif self.path == "/update_weights_from_tensor":
            self._send(200, _receive_tensors(body))
        elif self.path == "/destroy_weights_update_group":
            self._send(200, _destroy(body))
        elif self.path in ("/begin_weight_update", "/end_weight_update"):
            self._send(200, _session(self.path == "/begin_weight_update"))
        elif self.path in ("/flush_cache", "/release_memory_occupation"):
            self._send(200, {})
        else:
            self._send(404, {})


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
