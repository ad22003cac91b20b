"""The fault tools themselves: a ledger check that could not see a loss or a double count, or a
proxy that did not really cut, would make every fault test pass for nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from aggregator.store import BufferedRow, Store, Verdict
from edge.outbox import Outbox
from fedline.netproxy import TcpProxy
from fedline.testing.ledger import reconcile


def _site(path, counters, settle):
    ob = Outbox(path, max_bytes=1 << 20, max_count=100)
    for c in counters:
        ob.put(site="s", counter=c, msg_id=f"u{c}", base_version=0, n_samples=10, epsilon=None, blob=b"x" * 10)
        ob.mark_sent(f"u{c}")
        if c in settle:
            ob.settle(c, f"u{c}", settle[c][0], None, settle[c][1])
    ob.close()


def _aggregator(path, versions: dict[int, list[int]], verdicts: list[Verdict]):
    st = Store(path)
    for v, counters in sorted(versions.items()):
        applied = [Verdict("s", c, f"u{c}", "applied", None, None, v) for c in counters]
        st.commit_version(
            v,
            b"w",
            None,
            {"updates": [{"site": "s", "counter": c, "msg_id": f"u{c}"} for c in counters]},
            applied,
            keep=10,
        )
    for vd in verdicts:
        st.record(vd)
    st.close()


def test_ledger_exact_when_every_update_has_one_verdict_and_one_place(tmp_path) -> None:
    _site(tmp_path / "o.sqlite", [1, 2, 3], {1: ("applied", 1), 2: ("applied", 1), 3: ("stale", 1)})
    _aggregator(tmp_path / "a.sqlite", {1: [1, 2]}, [Verdict("s", 3, "u3", "stale", "too_stale", None, 1)])
    rep = reconcile({"s": tmp_path / "o.sqlite"}, tmp_path / "a.sqlite")
    assert rep.exact, rep.problems()
    assert (rep.sealed, rep.applied, rep.stale) == (3, 2, 1)


def test_a_buffered_update_whose_later_receipt_was_lost_is_exact_if_superseded_but_not_if_refused(tmp_path) -> None:
    """Regression (a fresh-clone run of the kill -9 scenario): the site got 'buffered' for 2, then the
    aggregator replaced 2 by the site's 3 in the buffer and was killed before that receipt went out."""
    _site(tmp_path / "o.sqlite", [1, 2, 3], {1: ("applied", 1), 2: ("buffered", 1), 3: ("buffered", 1)})
    _aggregator(
        tmp_path / "a.sqlite",
        {1: [1]},
        [Verdict("s", 2, "u2", "stale", "superseded", "counter 3 took its place", 1)],
    )
    st = Store(tmp_path / "a.sqlite")  # 3 is in the live buffer
    buffered = Verdict("s", 3, "u3", "buffered", None, None, 1)
    st.add_buffered(BufferedRow(0, "s", 3, "u3", 1, 10, 0, 1.0, 1.0, ""), buffered, b"x", 1)
    st.close()
    rep = reconcile({"s": tmp_path / "o.sqlite"}, tmp_path / "a.sqlite")
    assert rep.exact, rep.problems()
    assert (rep.applied, rep.buffered, rep.stale) == (1, 1, 1)
    _aggregator(tmp_path / "b.sqlite", {1: [1]}, [Verdict("s", 2, "u2", "stale", "too_stale", None, 1)])
    rep = reconcile({"s": tmp_path / "o.sqlite"}, tmp_path / "b.sqlite")  # a refusal is never a later fate
    assert ("s", 2) in [k for k, *_ in rep.mismatched]


def test_ledger_sees_lost_duplicated_phantom_and_unsettled(tmp_path) -> None:
    # 1 applied twice (in two versions), 2 never decided, 3 decided but the site has no receipt, 9 sealed by no one
    _site(tmp_path / "o.sqlite", [1, 2, 3], {1: ("applied", 2)})
    _aggregator(tmp_path / "a.sqlite", {1: [1], 2: [1, 3, 9]}, [])
    rep = reconcile({"s": tmp_path / "o.sqlite"}, tmp_path / "a.sqlite")
    assert not rep.exact
    assert rep.duplicated == [("s", 1)]
    assert rep.lost == [("s", 2)]
    assert rep.unsettled == [("s", 3)]
    assert ("s", 9) in rep.phantom


def _pruned_run(tmp_path, site_state_of_5: tuple[str, int]):
    """30 updates, two per version, 5 stale; the aggregator keeps 10 counters of verdicts (1-20 pruned)."""
    st = Store(tmp_path / "a.sqlite")
    for v in range(1, 16):
        counters = [c for c in (2 * v - 1, 2 * v) if c != 5]
        if v == 3:
            st.record(Verdict("s", 5, "u5", "stale", "too_stale", None, 2))
        st.commit_version(
            v,
            b"w",
            None,
            {"updates": [{"site": "s", "counter": c, "msg_id": f"u{c}", "staleness": 0} for c in counters]},
            [Verdict("s", c, f"u{c}", "applied", None, None, v) for c in counters],
            keep=10,
            keep_verdicts=10,
        )
    assert min(v.counter for v in st.verdicts()) == 21
    st.close()
    _site(
        tmp_path / "o.sqlite",
        range(1, 31),
        {c: (site_state_of_5 if c == 5 else ("applied", (c + 1) // 2)) for c in range(1, 31)},
    )
    return reconcile({"s": tmp_path / "o.sqlite"}, tmp_path / "a.sqlite")


def test_ledger_settles_pruned_verdicts_from_lineage_and_receipts_and_still_sees_a_loss(tmp_path) -> None:
    rep = _pruned_run(tmp_path / "ok", ("stale", 2))
    assert rep.exact, rep.problems()
    assert (rep.sealed, rep.applied, rep.stale, rep.pruned) == (30, 29, 1, 20)
    lost = _pruned_run(tmp_path / "lost", ("sent", 0))  # no receipt, no verdict row, in no lineage
    assert lost.lost == [("s", 5)]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _roundtrip(port: int, timeout: float = 1.0) -> bytes:
    """What comes back for b"ping": the echo, b"" when the connection is reset or closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.read(4), timeout)
    except ConnectionError:
        return b""
    finally:
        writer.transport.abort()


async def test_proxy_forwards_cuts_blackholes_and_restores() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = await TcpProxy(server.sockets[0].getsockname()[1]).start()
    try:
        assert await _roundtrip(proxy.port) == b"ping"
        proxy.cut()
        assert await _roundtrip(proxy.port) == b""  # reset at once
        assert proxy.stats.refused == 1
        proxy.blackhole()
        with pytest.raises(asyncio.TimeoutError):  # accepted, and then silence
            await _roundtrip(proxy.port, timeout=0.5)
        assert proxy.stats.swallowed >= 4
        proxy.restore()
        assert await _roundtrip(proxy.port) == b"ping"
    finally:
        await proxy.stop()
        server.close()


def test_clock_shifts_wall_time_of_the_child_only() -> None:
    code = (
        "import time, datetime; from fedline.testing.clock import shift_wall_clock; t0 = time.time(); "
        "shift_wall_clock(-300); print(round(time.time() - t0), round(time.time_ns() / 1e9 - t0), "
        "round(datetime.datetime.now().timestamp() - t0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["-300", "-300", "-300"]
