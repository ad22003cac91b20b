"""Start ``fedline`` commands as real processes, stop them (TERM, or kill -9), read their RSS and log events.

The one launcher of child processes: the demo starts its federation with it, the fault rig and the
tests theirs. Why subprocesses and not tasks in one event loop: ``kill -9`` of a process, its restart
from what is on disk, and its memory over minutes are only real for a real process. Each child runs
in its own session (a signal to the parent's group does not reach it) with one torch thread (the
machine is shared), and writes its logs to its own file, which :func:`events` reads back when they
are JSON lines (``fedline --log-json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Launched:
    """One running (or finished) ``fedline`` process."""

    name: str
    args: list[str]
    popen: Any  # a subprocess.Popen, or in tests a fedline.testing.forkserver.ForkedProcess (the same methods)
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # to tell this run's log events from earlier runs'
    clock_offset_s: float = 0.0  # its wall clock (and so its log timestamps) runs this far off

    def since_start(self, name: str) -> list[dict[str, Any]]:
        """Events ``name`` logged by this run (not by an earlier run appending to the same file)."""
        t0 = self.started_wall + self.clock_offset_s - 0.5
        return [e for e in self.events(name) if e.get("ts", 0) >= t0]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would: no clean-up runs."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL after ``timeout`` (and say so: a clean stop must not hang)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
                raise RuntimeError(
                    f"{self.name} did not stop within {timeout} s of SIGTERM; log: {self.log_path}"
                ) from None
        return int(self.popen.returncode)

    def rss(self) -> int:
        """Resident set size in bytes (0 when the process is gone)."""
        import psutil  # a demo and test dependency, not the core's

        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return events(self.log_path, name)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def events(log_path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log events of a process (every run appended to the same file), optionally one event name."""
    out: list[dict[str, Any]] = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if not line.startswith("{"):
            continue  # tracebacks and other plain lines
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # a line torn by kill -9
        if name is None or doc.get("event") == name:
            out.append(doc)
    return out


class Launcher:
    """Starts processes; :meth:`stop_all` ends every one still running (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path, cwd: Path | None = None, json_logs: bool = True) -> None:
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd or REPO
        self.json_logs = json_logs  # --log-json (read back by events()); the demo's logs are for people
        self.procs: list[Launched] = []

    def start(
        self,
        name: str,
        fedline_args: list[str],
        *,
        clock_offset_s: float = 0.0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Launched:
        """``fedline [--log-json] <args>`` (with a shifted wall clock when ``clock_offset_s`` is not 0)."""
        args = ["--log-json", *fedline_args] if self.json_logs else list(fedline_args)
        if clock_offset_s:
            cmd = [sys.executable, "-m", "fedline.testing.clock", repr(float(clock_offset_s)), *args]
        else:
            cmd = [sys.executable, "-m", "fedline.cli", *args]
        log_path = self.logs / f"{name}.log"
        child_env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            **(env or {}),
        )
        popen: Any
        if os.environ.get("FEDLINE_LAUNCH_FORKSERVER") == "1":  # tests: a fork of a warm parent (no torch import)
            from fedline.testing import forkserver

            popen = forkserver.spawn(
                args, cwd=Path(cwd or self.cwd), env=child_env, log=log_path, clock_offset_s=clock_offset_s
            )
        else:
            with log_path.open("ab") as fh:
                popen = subprocess.Popen(
                    cmd, cwd=cwd or self.cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=child_env
                )
        p = Launched(name, fedline_args, popen, log_path, clock_offset_s=clock_offset_s)
        self.procs.append(p)
        return p

    def dead(self) -> list[Launched]:
        """The processes that have exited."""
        return [p for p in self.procs if not p.alive()]

    def restart(self, p: Launched, **kw: Any) -> Launched:
        """The same command again (after a kill), logging to the same file."""
        return self.start(p.name, p.args, **kw)

    def stop_all(self, timeout: float = 20.0, names: list[str] | None = None) -> dict[str, int]:
        """SIGTERM every live process (or those ``names``), then wait, SIGKILL after ``timeout``; returns exit
        codes by name (last run of each)."""
        chosen = [p for p in self.procs if names is None or p.name in names]
        for p in chosen:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for p in chosen:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(10)
            codes[p.name] = int(p.popen.returncode)
        return codes
