"""A thread's Python name, also at the OS level: what ``top -H``, ``ps -T`` and /proc/<pid>/task/*/comm show.

Why: CPython before 3.14 keeps a ``threading.Thread``'s name to itself, so every thread of a fedline
process shows as "python" to the operating system. An operator looking at a busy aggregator with
``top -H`` could not tell the event loop (MQTT, reassembly, receipts) from the opening threads (decrypt,
verify, validate: ``agg-open_N``), the decider (``agg-decide_0``) or the exporter (``agg-export_0``);
``bench/scale.py`` splits the aggregator's CPU per update by these names.

:func:`name_os_thread` gives the calling thread its name through Linux's ``pthread_setname_np``; the
kernel keeps at most 15 bytes, so a longer name is cut there (never refused). Elsewhere, or if the call
fails, it does nothing but say so in a debug log: a thread's OS name is for people, never worth an error.
It is called in the thread it names: as a ``ThreadPoolExecutor``'s ``initializer`` (its threads run it
first, with ``threading.current_thread().name`` = ``<thread_name_prefix>_<N>``), or with an explicit
name for a service's main thread (:func:`run_named`).

One thing to know when reading ``top -H``: a new thread inherits the OS name of the thread that started
it until it names itself. So :func:`run_named` also gives the event loop a default executor whose threads
name themselves (``asyncio_N``, as asyncio calls them): otherwise they showed as a second ``fedline-agg``.
Helper threads a library starts from a named thread (torch's, for instance) still show that thread's name.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("fedline.threadname")

T = TypeVar("T")
TASK_COMM_LEN = 15  # the kernel's limit on a thread's name, in bytes (16 with the terminating NUL)


def os_name(name: str) -> bytes:
    """``name`` as the kernel will hold it: UTF-8, cut to 15 bytes without splitting a character."""
    return name.encode("utf-8")[:TASK_COMM_LEN].decode("utf-8", "ignore").encode("utf-8")


@functools.cache
def _setter() -> Any:
    """glibc's (or musl's) ``pthread_setname_np`` and ``pthread_self``, or None where there are none."""
    if not sys.platform.startswith("linux"):  # macOS's takes one argument and names only the caller: not wired
        log.debug("thread names stay Python's own on %s", sys.platform)
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        setname, self_ = libc.pthread_setname_np, libc.pthread_self
    except (OSError, AttributeError) as exc:
        log.debug("no pthread_setname_np (%s): thread names stay Python's own", exc)
        return None
    self_.restype = ctypes.c_void_p  # pthread_t: an unsigned long on glibc, a pointer on musl
    self_.argtypes = []
    setname.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setname.restype = ctypes.c_int
    return lambda raw: setname(self_(), raw)


def name_os_thread(name: str | None = None) -> bool:
    """Give the calling thread ``name`` (default: its ``threading`` name) at the OS level, cut to 15 bytes.

    True when the name was set; False where it cannot be (not Linux, no pthread_setname_np, an error),
    which is logged at debug level. Never raises: it runs as thread pools' ``initializer``, where an
    exception would break the pool.
    """
    try:
        set_name = _setter()
        if set_name is None:
            return False
        raw = os_name(name if name is not None else threading.current_thread().name)
        err = set_name(raw)
        if err:
            log.debug("pthread_setname_np(%r) failed: errno %d", raw, err)
        return not err
    except Exception as exc:  # a name is never worth stopping a thread for
        log.debug("could not name the thread %r: %r", name, exc)
        return False


def run_named(main: Coroutine[Any, Any, T], name: str) -> T:
    """``asyncio.run(main)`` with the process's threads named at the OS level: the calling thread (the event
    loop's; called from the main thread, as the CLI does, also the process's name in ``ps`` and ``top``)
    ``name``, the loop's default executor's threads ``asyncio_N`` (:func:`asyncio.to_thread`, name lookups),
    which would otherwise inherit ``name``."""
    name_os_thread(name)

    async def named() -> T:
        executor = ThreadPoolExecutor(thread_name_prefix="asyncio", initializer=name_os_thread)
        asyncio.get_running_loop().set_default_executor(executor)  # asyncio.run shuts it down at the end
        return await main

    return asyncio.run(named())


__all__ = ["TASK_COMM_LEN", "name_os_thread", "os_name", "run_named"]
