"""A warm parent for ``fedline`` test processes: torch imported once, each process a fork of it.

Why: a ``fedline edge`` or ``fedline aggregator`` spends 4-7 s of CPU importing torch, Opacus and ONNX
before it does anything, and the test suite starts about fifty of them on a 2-core CI machine. With
``FEDLINE_LAUNCH_FORKSERVER=1`` (tests/conftest.py sets it; ``make demo`` and production never do),
:class:`fedline.launch.Launcher` asks one server per test process to fork a child instead: the child
gets its own session, working directory, environment, log file and wall-clock shift, re-seeds its
random generators, and runs ``fedline.cli.main`` exactly as ``python -m fedline.cli`` would. It is
still a real process (its own pid, SIGTERM and kill -9 work, its memory is its own); only the imports
are inherited. The server runs no torch op before forking (fork after a parallel op can deadlock) and
imports nothing that starts a thread (onnxruntime does: children import it themselves).

Protocol (one Unix-socket connection per child): the client sends one JSON line ``{"args", "cwd", "env",
"log", "clock_offset_s"}``; the server answers ``{"pid": n}`` and, when the child exits, ``{"returncode":
rc}`` (negative for a signal, as :class:`subprocess.Popen` reports it), then closes the connection.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ENV = "FEDLINE_LAUNCH_FORKSERVER"
#: what the children would import anyway (fedline.cli's parts are found and imported by build_parser)
PRELOAD = ("torch", "opacus", "onnx", "edge.agent", "aggregator.service")
REPO = Path(__file__).resolve().parents[2]


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


# -- the client side (in the test process) ------------------------------------------------------------
class ForkedProcess:
    """The part of :class:`subprocess.Popen` the launcher uses, for a child of the fork server."""

    def __init__(self, conn: socket.socket, args: list[str]) -> None:
        self._conn = conn
        self._buf = b""
        self.args = args
        self.returncode: int | None = None
        self.pid = int(self._read(timeout=None)["pid"])

    def _read(self, timeout: float | None) -> dict[str, Any]:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the fork server went away while running {self.args}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError, BlockingIOError):
                self._finish(self._read(timeout=0.0))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._finish(self._read(timeout=timeout))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def _finish(self, doc: dict[str, Any]) -> None:
        self.returncode = int(doc["returncode"])
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    """The running server of this process (started on first use, stopped at exit)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fedline-fork-"))
        self.path = self.dir / "s"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedline.testing.forkserver", str(self.path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=env,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.dir.rmdir()


_server: _Server | None = None
_lock = threading.Lock()


def spawn(args: list[str], *, cwd: Path, env: dict[str, str], log: Path, clock_offset_s: float = 0.0) -> ForkedProcess:
    """``fedline <args>`` as a fork of this process's server (started on first use)."""
    global _server
    with _lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        path = _server.path
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    doc = {"args": args, "cwd": str(cwd), "env": env, "log": str(log), "clock_offset_s": clock_offset_s}
    conn.sendall(json.dumps(doc).encode() + b"\n")
    return ForkedProcess(conn, args)


# -- the server side --------------------------------------------------------------------------------
def _child(doc: dict[str, Any], inherited: list[socket.socket]) -> None:
    """In the forked child: become the requested process, run the command, never return."""
    code = 1
    try:
        for sock in inherited:  # the server's listener and its connections to the other children
            sock.close()
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(doc["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(doc["cwd"])
        os.environ.clear()
        os.environ.update(doc["env"])
        _reseed()
        if doc.get("clock_offset_s"):
            from fedline.testing.clock import shift_wall_clock

            shift_wall_clock(float(doc["clock_offset_s"]))
        from fedline.cli import main

        sys.argv = ["fedline", *doc["args"]]
        code = main(list(doc["args"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(int(code or 0))


def _reseed() -> None:
    """A fork shares its parent's generator states: give each child its own, as a fresh interpreter has."""
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch.seed()


def _warm() -> None:
    """One tiny DP-SGD round and one ONNX export, so that each child does not pay the first call's lazy set-up
    again (2-10 s of CPU on a loaded machine: Opacus' and autograd's first use, the exporter). Single-threaded
    (OMP_NUM_THREADS=1, one torch thread), which ``serve`` checks before it forks anything."""
    import numpy as np
    import torch

    from edge.config import PrivacyConfig, TrainingConfig
    from edge.trainer import plan_round, train_round
    from fedline.config import parse
    from models import ModelSpec, build_model
    from models.export import export_onnx
    from models.flat import shared_state

    torch.set_num_threads(1)
    spec = parse(ModelSpec, {"kind": "mlp", "n_features": 3, "hidden": [8], "task": "classification", "personal": []})
    model = build_model(spec, seed=0)
    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    cfg = TrainingConfig(threads=1)
    train_round(
        spec,
        shared_state(model, spec),
        None,
        x,
        (x[:, 0] > 0).astype(np.int64),
        cfg,
        PrivacyConfig(),
        None,
        0,
        plan_round(64, cfg),
    )
    export_onnx(model, spec)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from fedline.cli import build_parser

    build_parser()  # imports every part's command module
    _warm()
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork copies only the calling thread: a pool thread's lock could be held for ever
        raise SystemExit(f"the fork server has {threads} threads after warming up; it must have one to fork")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    print("ready", flush=True)
    while not stopping and os.getppid() == parent:
        for _key, _events in sel.select(timeout=0.05):
            conn, _addr = listener.accept()
            conn.settimeout(10)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if not buf.endswith(b"\n"):
                conn.close()
                continue
            doc = json.loads(buf)
            pid = os.fork()
            if pid == 0:
                _child(doc, [listener, conn, *children.values()])
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            children[pid] = conn
        _reap(children)
    for pid in list(children):  # the test process is gone or stopped us: leave no child behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"returncode": rc}).encode() + b"\n")
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
