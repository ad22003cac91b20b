"""A version's commit, made cheaper (issue 19), commits what it did: the server step bit for bit, the statements
of a transaction in their order, the files named by rows, and the verdict window's bound."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import robust
from aggregator.store import _PRUNE_VERDICTS, PRUNE_STRIDE_DIVISOR, BufferedRow, Store, Verdict, _runs
from aggregator.strategies import aggregate


def _two_pass(model, step, lr, momentum=None, beta=0.0):
    """The server step as it was before 2 Dec 2026: a copy of the model, then ``robust.add_scaled``."""
    if beta > 0:
        m = {k: (beta * momentum[k] + step[k]).astype(np.float32) if momentum else np.array(step[k]) for k in step}
        step = m
    new = {k: np.array(v, dtype=np.float32, copy=True) for k, v in model.items()}
    for k in new:
        robust.add_scaled(new[k], step[k], lr)
    return new


def _state(rng, shapes, scale=1.0):
    out = {}
    for i, shape in enumerate(shapes):  # magnitudes over many binades, so products and sums round
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape)) * scale
        out[f"t{i}"] = np.asarray(x, np.float32)
    return out


SHAPES = [(), (7,), (300, 256), (256,), (70_000,)]  # a 0-d array, and one above add_scaled's 64k block


@pytest.mark.parametrize("lr", [1.0, 0.5, 0.1, 1.7])
def test_the_server_step_is_bit_for_bit_the_copy_then_add_scaled(lr: float) -> None:
    rng = np.random.default_rng(19)
    model, step = _state(rng, SHAPES), _state(rng, SHAPES, 1e-3)
    before = {k: v.copy() for k, v in model.items()}
    new, momentum = aggregate.server_step(model, step, lr)
    old = _two_pass(model, step, lr)
    assert momentum is None
    for k in model:
        assert new[k].dtype == np.float32 and new[k].shape == model[k].shape and new[k].flags["C_CONTIGUOUS"]
        assert new[k].tobytes() == old[k].tobytes(), k
        assert new[k] is not model[k] and model[k].tobytes() == before[k].tobytes()  # the model is not touched
    if lr in (0.1, 1.7):  # the test can tell: one rounding of x + lr * step (in float64) differs somewhere
        once = np.asarray(model["t2"], np.float64) + lr * np.asarray(step["t2"], np.float64)
        assert (once.astype(np.float32) != old["t2"]).any()


def test_the_server_step_with_momentum_and_a_float64_step_rounds_as_before() -> None:
    rng = np.random.default_rng(20)
    model, step, mom = _state(rng, SHAPES), _state(rng, SHAPES, 1e-3), _state(rng, SHAPES, 1e-3)
    new, m = aggregate.server_step(model, step, 0.3, mom, 0.9)
    old = _two_pass(model, step, 0.3, mom, 0.9)
    assert m is not None and all(new[k].tobytes() == old[k].tobytes() for k in model)
    wide = {k: np.asarray(v, np.float64) for k, v in step.items()}  # a float64 step: the product is float64
    new64, _ = aggregate.server_step(model, wide, 0.1)
    old64 = _two_pass(model, wide, 0.1)
    assert all(new64[k].dtype == np.float32 and new64[k].tobytes() == old64[k].tobytes() for k in model)


def test_runs_keep_the_statements_order_and_a_transaction_commits_what_one_execute_each_would() -> None:
    put, drop = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", "DELETE FROM meta WHERE key = ?"
    statements = [(put, ("a", "1")), (put, ("a", "2")), (drop, ("a",)), (put, ("a", "3")), (put, ("b", "4"))]
    assert _runs(statements) == [
        (put, [("a", "1"), ("a", "2")]),
        (drop, [("a",)]),
        (put, [("a", "3"), ("b", "4")]),
    ]
    assert _runs([]) == []


def test_a_transaction_s_runs_commit_in_order(tmp_path) -> None:
    store = Store(tmp_path / "s.sqlite")
    put, drop = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", "DELETE FROM meta WHERE key = ?"
    store.transaction([(put, ("a", "1")), (put, ("a", "2")), (drop, ("a",)), (put, ("a", "3")), (put, ("b", "4"))])
    assert store.rows("SELECT key, value FROM meta ORDER BY key") == [("a", "3"), ("b", "4")]  # not ("b", "4") alone
    store.close()


def _named(store: Store) -> set[str]:
    named = {r[0] for r in store.rows("SELECT file FROM buffer")}
    for w, m in store.rows("SELECT weights, momentum FROM checkpoints"):
        named.update(x for x in (w, m) if x)
    return named


def test_the_files_a_commit_drops_are_those_no_row_names_across_restarts_and_superseded_rows(tmp_path) -> None:
    """What a commit recycles and prunes is known from memory now: after every commit the files on disk are the
    ones rows name, plus at most two spare segments and one spare checkpoint, and the kept checkpoints are the
    newest ``keep``; a restart learns them from the rows."""
    path, keep, counter = tmp_path / "s.sqlite", 3, 0
    store = Store(path)
    rng = np.random.default_rng(1)
    for version in range(1, 15):
        if version == 8:
            store.close()
            store = Store(path)  # a restart between versions: the rows say what is named
        for site in ("a", "b", "c")[: int(rng.integers(1, 4))]:
            counter += 1
            v = Verdict(site, counter, f"m{counter}", "buffered", None, None, version - 1, 0, 0.5)
            row = BufferedRow(0, site, counter, v.msg_id, version - 1, 10, 0, 1.0, 0.5, "")
            store.add_buffered(row, v, bytes([counter % 256]) * int(rng.integers(100, 900)), version - 1)
        if version % 4 == 0:  # a newer update of the same site takes its buffered one's place
            old = store.buffered()[0][0]
            counter += 1
            stale = Verdict(old.site, old.counter, old.msg_id, "stale", "superseded", None, version - 1, 0, 0.0)
            v = Verdict(old.site, counter, f"m{counter}", "buffered", None, None, version - 1, 0, 0.5)
            row = BufferedRow(0, old.site, counter, v.msg_id, version - 1, 10, 0, 1.0, 0.5, "")
            store.add_buffered(row, v, b"x" * 300, version, replaces=stale)  # a later segment than its rows'
        applied = [
            Verdict(r.site, r.counter, r.msg_id, "applied", None, None, version, 0, 0.5) for r, _ in store.buffered()
        ]
        store.commit_version(version, bytes([version]) * (1000 + version), None, {"v": version}, applied, keep)
        on_disk = {p.name for p in store.blob_dir.iterdir()}
        named = _named(store)
        assert named <= on_disk
        spare = on_disk - named
        assert len([n for n in spare if n.startswith("spare-buffer-")]) <= 2
        assert len([n for n in spare if n.endswith(".weights")]) <= 1 and all(
            n.startswith("spare-buffer-") or n.endswith(".weights") for n in spare
        ), spare
        assert store.kept_checkpoints() == list(range(max(0, version - keep) + 1, version + 1))
        assert store.buffered() == []
        for v in store.kept_checkpoints():
            assert store.checkpoint(v).weights == bytes([v]) * (1000 + v)
    store.close()


class _Prunes:
    """The store's connection, counting the sites whose old verdicts a statement prunes."""

    def __init__(self, db) -> None:
        self.db, self.sites = db, 0

    def execute(self, sql: str, *args):
        self.sites += sql == _PRUNE_VERDICTS
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, rows):
        rows = list(rows)
        self.sites += len(rows) if sql == _PRUNE_VERDICTS else 0
        return self.db.executemany(sql, rows)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def _kept(store: Store, site: str, buffered: bool = False) -> list[int]:
    op = "=" if buffered else "!="
    sql = f"SELECT counter FROM verdicts WHERE site = ? AND verdict {op} 'buffered' ORDER BY counter"
    return [r[0] for r in store.rows(sql, (site,))]


@pytest.mark.parametrize("keep_verdicts", [10, 32, 160])
def test_each_site_keeps_its_newest_keep_verdicts_counters_and_at_most_a_stride_more(tmp_path, keep_verdicts) -> None:
    """Pruned in steps of a sixteenth of ``keep_verdicts``: every counter within ``keep_verdicts`` of a site's
    newest is kept, none more than ``keep_verdicts + stride - 1`` below it, and a restart prunes at its first
    version; a refused verdict is pruned like an applied one."""
    stride = max(1, keep_verdicts // PRUNE_STRIDE_DIVISOR)
    path, versions, restart = tmp_path / "s.sqlite", 3 * keep_verdicts, 2 * keep_verdicts
    store = Store(path)
    counted = store._db = _Prunes(store._db)  # type: ignore[assignment]
    decided: dict[str, list[int]] = {"a": [], "b": []}
    over, pruned = 0, 0
    for version in range(1, versions + 1):
        if version == restart:
            pruned += counted.sites
            store.close()
            store = Store(path)
            counted = store._db = _Prunes(store._db)  # type: ignore[assignment]
        a = len(decided["a"]) + 1
        if version % 2:  # site a's counters move by 1 or 2 a version, site b's by 1-3
            store.record(Verdict("a", a, f"r{a}", "rejected", "norm", None, version - 1))  # pruned like the others
            decided["a"].append(a)
            a += 1
        b = (decided["b"][-1] if decided["b"] else 0) + 1 + version % 3
        decided["a"].append(a)
        decided["b"].append(b)
        applied = [Verdict(s, c[-1], f"m{c[-1]}", "applied", None, None, version, 0, 0.5) for s, c in decided.items()]
        store.commit_version(version, b"w", None, {}, applied, keep=2, keep_verdicts=keep_verdicts)
        for site, counters in decided.items():
            top, kept = counters[-1], _kept(store, site)
            assert [c for c in counters if c > top - keep_verdicts] == [c for c in kept if c > top - keep_verdicts]
            assert kept[0] >= top - keep_verdicts - stride + 2, (site, top, kept[0])  # the bound
            assert kept == [c for c in counters if c >= kept[0]]  # only whole ranges below are gone
            over = max(over, len([c for c in kept if c <= top - keep_verdicts]))
            if version == restart:  # its first version pruned every site to the window
                assert kept[0] > top - keep_verdicts
    pruned += counted.sites
    store.close()
    assert (over > 0) == (stride > 1)  # pruning in steps keeps more than the window at times (the test can tell)
    # a site is pruned once its newest counter moved a stride (and once after each start), not at every version
    most = sum(c[-1] // stride + 2 for c in decided.values())
    assert pruned <= most and (stride == 1 or most < 2 * versions)
    assert pruned >= sum(c[-1] // (stride + 2) - 1 for c in decided.values())  # yet it does prune


def test_a_buffered_verdict_is_never_pruned(tmp_path) -> None:
    store = Store(tmp_path / "s.sqlite")
    v = Verdict("a", 1, "m1", "buffered", None, None, 0, 0, 0.5)
    store.add_buffered(BufferedRow(0, "a", 1, "m1", 0, 10, 0, 1.0, 0.5, ""), v, b"x" * 10, 0)
    for version in range(1, 40):
        applied = [Verdict("a", version + 1, f"m{version + 1}", "applied", None, None, version, 0, 0.5)]
        store.commit_version(version, b"w", None, {}, applied, keep=2, keep_verdicts=10, keep_buffer=True)
    assert _kept(store, "a", buffered=True) == [1]  # 39 counters above it, far past the window
    assert _kept(store, "a")[0] > 40 - 10 - 1
    store.close()


def test_a_commit_s_work_does_not_grow_with_the_versions_made(tmp_path) -> None:
    """The pruned checkpoints' rows are updated by version, not found by reading every older row: the SQLite VM
    instructions of a commit at version ~600 are those at version ~30 (counted, not timed). The range UPDATE it
    replaced read each older checkpoint row at every version: 1.3 ms at version 2,500, 15 ms at 20,000."""
    store = Store(tmp_path / "s.sqlite")
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0  # go on

    store._db.set_progress_handler(step, 1)
    lineage = {"updates": [{"site": f"s{i}", "counter": 1, "weight": 0.1} for i in range(10)]}
    per_version: dict[int, int] = {}
    for version in range(1, 601):
        steps[0] = 0
        store.commit_version(version, b"w" * 64, b"m" * 64, lineage, [], keep=3)
        per_version[version] = steps[0]
    early = sorted(per_version[v] for v in range(20, 40))[10]
    late = sorted(per_version[v] for v in range(580, 600))[10]
    assert late <= 1.2 * early, (early, late)
    assert store.kept_checkpoints() == [598, 599, 600]
    nulls = store.rows("SELECT COUNT(*) FROM checkpoints WHERE weights IS NULL AND momentum IS NULL")[0][0]
    assert nulls == 597 and len(store.rows("SELECT version FROM checkpoints")) == 600
    assert {p.name for p in store.blob_dir.iterdir()} >= {
        f"model-{v}.{k}" for v in (598, 599, 600) for k in ("weights", "momentum")
    }
    store.close()
