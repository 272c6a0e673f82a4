"""SGLang server processes: launch, wait for health, restart, and never leave one orphaned.

Each server is ``<python> -m sglang.launch_server ...`` started in its own session (process
group), with stdout and stderr in a log file. Every live server is registered so that the parent
stops them all on normal exit (``atexit``), on Ctrl-C (``KeyboardInterrupt`` unwinds to atexit), on
SIGTERM/SIGHUP (a handler stops them, then defers to the previous handler), and when the parent
dies abruptly (SIGKILL): a watchdog thread in the launched server notices that its parent changed
and terminates its own process group.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# ``python -c _LAUNCHER <parent pid> <module> <args...>``: runs ``module`` (sglang.launch_server, or
# sglang_router.launch_router) with a watchdog that takes the process's whole group down if the
# parent process goes away.
# (PR_SET_PDEATHSIG would fire when the *thread* that started the child exits, which the engine's
# worker threads do.)
# The API key comes in the environment (HPT_SGLANG_API_KEY, removed at once) and joins sys.argv
# here, so that no process's command line shows it.
_LAUNCHER = """
import os, runpy, signal, sys, threading, time
parent, module = int(sys.argv[1]), sys.argv[2]
sys.argv = [module, *sys.argv[3:]]
_key = os.environ.pop("HPT_SGLANG_API_KEY", None)
if _key:
    sys.argv += ["--api-key", _key]
def _watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os.killpg(0, signal.SIGTERM)
threading.Thread(target=_watch, daemon=True, name="hpt-parent-watchdog").start()
if module == "sglang_router.launch_router":
    # launch_router's own main imports the Python mini load balancer, which pulls in all of
    # sglang and torch (a minute of CPU) for nothing: start the Rust router directly.
    import argparse
    from sglang_router.router import Router
    from sglang_router.router_args import RouterArgs
    parser = argparse.ArgumentParser(prog=module)
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    args = RouterArgs.from_cli_args(parser.parse_args(sys.argv[1:]), use_router_prefix=False)
    args._validate_router_args()
    Router.from_args(args).start()
else:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

_LIVE: set[SGLangServer] = set()
_LIVE_LOCK = threading.Lock()
_HOOKS_INSTALLED = False


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy; the message quotes its log."""


@dataclass(kw_only=True)
class ServerLaunch:
    """Everything needed to (re)start one server."""

    python: str
    args: list[str]  # after ``-m <module>``
    host: str
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the parent's environment
    api_key: str | None = None
    startup_timeout_s: float = 900.0
    module: str = "sglang.launch_server"  # or "sglang_router.launch_router"
    # The port was picked free here (not given by the user): at the first start it may move to
    # another when some other process takes it before the server binds it.
    movable_port: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def move_port(self) -> None:
        """Another free port (in ``args`` too)."""
        old = self.port
        self.port = free_port(self.host)
        self.args = [
            str(self.port) if a == str(old) and prev == "--port" else a
            for prev, a in zip(["", *self.args], self.args)
        ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the usual race with other processes applies)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class SGLangServer:
    """One SGLang server child process.

    Args:
        launch: how to start it; ``launch.args`` is reused on ``restart``.
    """

    def __init__(self, launch: ServerLaunch) -> None:
        self.launch = launch
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._port_hold: socket.socket | None = None

    @property
    def url(self) -> str:
        return self.launch.url

    def start(self, wait: bool = True) -> None:
        """Start the process (and, by default, block until it is healthy)."""
        if not Path(self.launch.python).exists():
            raise ServerStartError(
                f"SGLang python {self.launch.python} does not exist: build the environment with "
                "`bash tools/sglang_env.sh` or set rollout.sglang.python"
            )
        _install_exit_hooks()
        if self._port_hold is None and self.launch.module == SERVER_MODULE:
            self._port_hold = hold_port(self.launch.host, self.launch.port)
        self.launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.launch.python, "-c", _LAUNCHER, str(os.getpid()), self.launch.module]
        cmd += self.launch.args
        env = {**os.environ, **self.launch.env}
        key = self.launch.api_key
        if key:
            env["HPT_SGLANG_API_KEY"] = key
        shown = " ".join([self.launch.python, "-m", self.launch.module, *self.launch.args])
        with open(self.launch.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} starting: {shown}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                # With a key, the output passes through a copier that blanks it (SGLang logs its
                # server_args, the key among them).
                stdout=subprocess.PIPE if key else log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # own process group: stop() reaches its children too
            )
        if key:
            _copy_redacted(self.proc, self.launch.log_path, key)
        with _LIVE_LOCK:
            _LIVE.add(self)
        logger.info("sglang server pid %d starting at %s", self.proc.pid, self.url)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout_s: float | None = None) -> None:
        """Poll ``/health`` until it answers 200 from this server's own process; on exit or
        timeout stop it and raise.

        The port is held from the start (``hold_port``), but a process that probes ports with
        ``SO_REUSEADDR`` (as SGLang does for its internal ports) can still take it before the
        server binds (the server then exits with uvicorn's startup-failure code 3, after its
        warmup, which went to the other process, "succeeded"). A port picked here then moves
        at the first start, at most ``PORT_MOVES`` times; a port the user gave, or a restarted
        server's (its URL is known), does not.
        """
        timeout_s = self.launch.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        moves = 0
        while time.monotonic() < deadline:
            taken = self.proc is not None and port_taken(self.launch.port, self.proc.pid)
            if not self.is_alive() or taken:
                code = self.proc.returncode if self.proc else None
                taken = taken or "address already in use" in self.log_tail().lower()
                if taken and self.launch.movable_port and not self.restarts and moves < PORT_MOVES:
                    moves += 1
                    self.stop()
                    old = self.url
                    self.launch.move_port()
                    logger.warning(
                        "port of sglang server %s was taken by another process; moving to %s",
                        old,
                        self.url,
                    )
                    self.start(wait=False)
                    continue
                self.stop()
                why = (
                    "its port is taken by another process" if taken else f"exited with code {code}"
                )
                raise ServerStartError(
                    f"SGLang server at {self.url} failed during startup ({why}); "
                    f"log {self.launch.log_path}:\n{self.log_tail()}"
                )
            if self.health():
                logger.info("sglang server at %s is healthy", self.url)
                return
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(
            f"SGLang server at {self.url} was not healthy after {timeout_s:.0f} s; "
            f"log {self.launch.log_path}:\n{self.log_tail()}"
        )

    def health(self, timeout_s: float = 5.0) -> bool:
        """Whether the process is alive and ``/health`` answers 200."""
        if not self.is_alive():
            return False
        request = urllib.request.Request(f"{self.url}/health", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def auth_headers(self) -> dict[str, str]:
        key = self.launch.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 10.0, *, keep_port: bool = False) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left after ``grace_s``;
        the port's hold goes too unless ``keep_port`` (a restart keeps it)."""
        if not keep_port and self._port_hold is not None:
            self._port_hold.close()
            self._port_hold = None
        proc, self.proc = self.proc, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("sglang server pid %d ignored SIGTERM; killing it", proc.pid)
        # Its workers share the group; whatever survived the leader goes now.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def restart(self, args: list[str] | None = None) -> None:
        """Stop (if needed) and start again, optionally with new launch arguments."""
        self.stop(keep_port=True)
        if args is not None:
            self.launch.args = args
        self.restarts += 1
        # The restarted server keeps its URL: a killed server's processes can hold its port for
        # a while after the kill (their exit is slow on a loaded machine), and a start meanwhile
        # would fail with the port taken.
        deadline = time.monotonic() + PORT_RELEASE_S
        while port_listeners(self.launch.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        logger.warning("restarting sglang server at %s (restart %d)", self.url, self.restarts)
        self.start(wait=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.launch.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class ExternalServer:
    """A server (or sglang-router) that the user started (``rollout.sglang.urls``).

    Same interface as ``SGLangServer`` to the pool and the client, but never started, stopped or
    killed from here: ``restart`` only waits for it to answer ``/health`` again.

    Args:
        url: its base URL, ``http://host:port``.
        api_key: the key it was started with, if any.
        timeout_s: how long ``restart`` waits for it to come back.
        key: the config key that lists it, for error messages (``algorithm.teacher.urls`` for
            a teacher's).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        key: str = "rollout.sglang.urls",
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.key = key
        self.restarts = 0

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self, timeout_s: float = 5.0) -> bool:
        return http_health(self.url, self.auth_headers(), timeout_s) is None

    def is_alive(self) -> bool:
        return self.health()

    def check(self, timeout_s: float = 10.0) -> None:
        """Raise ``ServerStartError`` naming the URL unless ``/health`` answers 200."""
        why = http_health(self.url, self.auth_headers(), timeout_s)
        if why is not None:
            raise ServerStartError(
                f"{self.key}: the SGLang server at {self.url} is not usable: {why}"
            )

    def stop(self, grace_s: float = 0.0) -> None:
        """Nothing: a server the user started is the user's to stop."""

    def restart(self, args: list[str] | None = None) -> None:
        """Wait (up to ``timeout_s``) for the server to answer again; it is not ours to start."""
        self.restarts += 1
        logger.warning("external sglang server %s is down; waiting for it to come back", self.url)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.health():
                return
            time.sleep(1.0)
        raise ServerStartError(
            f"{self.key}: the external SGLang server {self.url} did not come back within "
            f"{self.timeout_s:.0f} s (servers listed there are never restarted from here)"
        )

    def log_tail(self, lines: int = 40) -> str:
        return "(started outside this run: its log is wherever it was started)"


PORT_MOVES = 3
SERVER_MODULE = "sglang.launch_server"


def hold_port(host: str, port: int) -> socket.socket | None:
    """Hold ``host:port`` for a server of ours for as long as it runs and while it restarts
    (``None`` where it cannot be held now, e.g. the old server still listens).

    The hold is a socket bound with ``SO_REUSEADDR`` that never listens. The kernel then gives
    this port to no other process's ``bind(0)`` or outgoing connection, and refuses a plain bind
    of it; the server itself can still bind and listen on it, since uvicorn (SGLang's HTTP
    server) binds with ``SO_REUSEADDR`` too. Without it, a port freed by a dead server stays
    free for the whole start-up of its replacement (minutes on CPU), and a busy host gives it
    away meanwhile.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


PORT_RELEASE_S = 60.0  # how long a restart waits for the old process to free its port


def port_listeners(port: int) -> set[str]:
    """The sockets (``socket:[inode]``) listening on TCP ``port`` of this host, from
    ``/proc/net`` (empty where there is none to read)."""
    listeners: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                listeners.add(f"socket:[{cols[9]}]")
    return listeners


def port_taken(port: int, pid: int) -> bool:
    """Whether some process other than ``pid`` listens on TCP ``port`` of this host."""
    listeners = port_listeners(port)
    if not listeners:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in listeners:
                return False
    return True


def http_health(url: str, headers: dict[str, str], timeout_s: float) -> str | None:
    """``None`` when ``<url>/health`` answers 200, else why not (for error messages)."""
    request = urllib.request.Request(f"{url}/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return None
            return f"/health answered {response.status}"
    except urllib.error.HTTPError as err:
        hint = " (wrong or missing API key: rollout.sglang.api_key_env)" if err.code == 401 else ""
        return f"/health answered {err.code}{hint}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"cannot connect ({reason})"


def _copy_redacted(proc: subprocess.Popen[bytes], log_path: Path, secret: str) -> None:
    """Append ``proc``'s output to ``log_path`` with ``secret`` replaced, from a daemon thread
    (it ends when the process and its children have closed the pipe)."""
    assert proc.stdout is not None
    stream, needle = proc.stdout, secret.encode()

    def copy() -> None:
        with open(log_path, "ab") as log:
            for line in stream:
                log.write(line.replace(needle, b"<api-key>"))
                log.flush()
        stream.close()

    threading.Thread(target=copy, daemon=True, name=f"sglang-log-{proc.pid}").start()


def stop_all_servers() -> None:
    """Stop every server this process started and has not stopped yet."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(grace_s=5.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the server leads its own group: pgid == pid


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    atexit.register(stop_all_servers)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be installed from the main thread
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        signal.signal(sig, _make_handler(sig, previous))


def _make_handler(sig: signal.Signals, previous: object) -> Callable[[int, object], None]:
    def handler(signum: int, frame: object) -> None:
        stop_all_servers()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    return handler
