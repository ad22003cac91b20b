"""fedline.threadname: fedline's threads carry their Python names at the OS level (what `top -H` and `ps -T` show).

Real threads, read back from /proc/self/task/*/comm (Linux, where the CI and the deployments run).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aggregator.core import AggregatorCore
from fedline.threadname import name_os_thread, os_name, run_named
from tests.aggregator.helpers import make_federation


def _os_names() -> dict[int, str]:
    """Every live thread of this process: native id -> the name the kernel holds."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = (task / "comm").read_text().rstrip("\n")
        except OSError:  # ended while we looked
            continue
    return out


def _pool_names(pool: ThreadPoolExecutor, n: int) -> dict[str, str]:
    """Python name -> OS name of ``n`` of the pool's threads, each held busy until all are seen."""
    barrier = threading.Barrier(n, timeout=10)

    def ident() -> tuple[str, int]:
        barrier.wait()  # n tasks at once: n distinct threads
        return threading.current_thread().name, threading.get_native_id()

    found = [f.result(timeout=20) for f in [pool.submit(ident) for _ in range(n)]]
    names = _os_names()
    return {py: names[tid] for py, tid in found}


def test_an_executor_with_the_initializer_names_its_threads_at_the_os_level() -> None:
    pool = ThreadPoolExecutor(2, thread_name_prefix="agg-probe", initializer=name_os_thread)
    try:
        got = _pool_names(pool, 2)
    finally:
        pool.shutdown()
    assert got == {"agg-probe_0": "agg-probe_0", "agg-probe_1": "agg-probe_1"}


def test_the_aggregator_cores_opening_threads_show_as_agg_open(tmp_path) -> None:
    fed = make_federation(tmp_path, ["site-a", "site-b"])
    core = AggregatorCore(fed.config(strategy='kind = "fedbuff"\nbuffer_size = 2'))
    try:
        got = _pool_names(core.pool, 2)  # the [aggregator] default: two opening threads
    finally:
        core.close()
    assert got == {"agg-open_0": "agg-open_0", "agg-open_1": "agg-open_1"}


def test_a_name_longer_than_15_bytes_is_cut_not_refused() -> None:
    main_before = _os_names()[os.getpid()]
    seen: dict[str, object] = {}

    def run() -> None:
        seen["ok"] = name_os_thread()  # its Python name, 24 bytes
        seen["os"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().rstrip("\n")
        seen["explicit"] = name_os_thread("fedline-aggregator-main")
        seen["os2"] = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().rstrip("\n")

    t = threading.Thread(target=run, name="intake-open-worker-12345")
    t.start()
    t.join(10)
    assert seen == {"ok": True, "os": "intake-open-wor", "explicit": True, "os2": "fedline-aggrega"}
    # cut on a character's boundary: "é" is 2 bytes, a 15-byte cut through it keeps 14 bytes
    assert os_name("a" * 14 + "é") == b"a" * 14
    assert os_name("short") == b"short"
    assert _os_names()[os.getpid()] == main_before  # each call named only the thread it ran in


def _own_os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().rstrip("\n")


def test_run_named_names_the_event_loop_and_its_default_executors_threads() -> None:
    """The loop's thread gets the service's name; asyncio.to_thread's threads their own (not the loop's)."""
    seen: dict[str, object] = {}

    async def service() -> str:
        seen["loop"] = _own_os_name()
        seen["to_thread"] = await asyncio.to_thread(lambda: (threading.current_thread().name, _own_os_name()))
        return "done"

    def run() -> None:  # in a thread of its own: pytest's main thread keeps its name
        seen["result"] = run_named(service(), "fedline-probe")

    t = threading.Thread(target=run, name="probe")
    t.start()
    t.join(20)
    assert seen == {"loop": "fedline-probe", "to_thread": ("asyncio_0", "asyncio_0"), "result": "done"}
