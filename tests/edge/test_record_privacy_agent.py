"""Per-record privacy in the agent: no budget on undeliverable updates, what operators see (issue 21)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from broker_bridge.client import Message
from broker_bridge.envelope import open_update, seal_receipt
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.testing.patience import bound
from tests.edge.helpers import Federation, write_csv, write_site

SITE = "site-a"
NOWHERE = "mqtt://127.0.0.1:9"  # nothing listens: a broker outage for as long as the test runs


def _agent(tmp_path, **kw) -> tuple[Federation, EdgeAgent]:
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 240)
    path = write_site(fed, SITE, csv, NOWHERE, None, **kw)
    return fed, EdgeAgent(load_edge_config(path))


async def test_outage_costs_one_round_per_base_version(tmp_path) -> None:
    """The broker is unreachable for the whole run; rounds are due every 0.05 s for 3 s (60 rounds: ten
    minutes at a round every 10 s, compressed). One update is sealed on base version 0, the other triggers
    are skipped as pending_receipt, so the rows' ε is that of one round. A signed "buffered" receipt still holds
    the base (another round would only replace it in the buffer); the flush's "applied" frees it."""
    fed, agent = _agent(tmp_path, training={"every_rows": 0, "every_s": 0.05, "max_pending_per_base": 1})
    await asyncio.wait_for(agent.ingest.run(), bound(20))
    loop = asyncio.create_task(agent.rounds.loop())  # the agent's own timer schedule; no broker to send to
    deadline = time.monotonic() + 60
    while not agent.outbox.ledger() and time.monotonic() < deadline and not loop.done():
        await asyncio.sleep(0.05)  # the first round (imports Opacus on a cold process)
    assert agent.last_error is None and agent.outbox.ledger(), agent.last_error
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        await asyncio.sleep(0.1)
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    ledger = agent.outbox.ledger()
    assert [(e.base_version, e.state) for e in ledger] == [(0, "queued")]
    assert agent.metrics.rounds_skipped.labels("pending_receipt")._value.get() >= 20
    assert agent.ledger is not None and agent.ledger.releases == 1
    one_round = agent.epsilon
    assert 0 < one_round <= agent.dp.epsilon

    # the aggregator's receipt comes back: "buffered" (it waits in the buffer, where a second update of this
    # site would only replace it) still holds the base; the flush's "applied" frees it
    (row,) = agent.outbox.pending(0)

    async def receipt(verdict: str, version: int | None) -> None:
        doc = {"site": SITE, "counter": row.counter, "msg_id": row.msg_id, "verdict": verdict, "reason": None}
        blob = seal_receipt({**doc, "version": version}, fed.aggregator, fed.sites[SITE].public().box_pub)
        await agent.handle_message(Message(agent.topics.receipts(SITE), blob))  # sealed to its site

    await receipt("buffered", None)
    skipped = agent.metrics.rounds_skipped.labels("pending_receipt")._value.get()
    assert await agent.train_once() is None and agent.ledger.releases == 1
    assert agent.metrics.rounds_skipped.labels("pending_receipt")._value.get() == skipped + 1
    await receipt("applied", 1)
    assert await agent.train_once() is not None
    assert await agent.train_once() is None  # and again only one without a receipt
    assert agent.ledger.releases == 2 and agent.epsilon > one_round
    agent.close()


async def test_status_and_metrics_carry_the_per_record_guarantee(tmp_path) -> None:
    """Status: per-record ε, budget, δ, privacy unit (public parameters, no row counts). /metrics: also the
    rows eligible and retired, and the ε one global accountant would report. The sealed header says so too."""
    fed, agent = _agent(tmp_path, privacy={"epsilon": 3.0, "noise_multiplier": 1.5})
    await asyncio.wait_for(agent.ingest.run(), bound(20))
    while await agent.train_once() is not None:
        pass
    status = agent.status()
    assert status["accounting"] == "per_record" and status["privacy_unit"] == "row"
    assert status["delta"] == 1e-5 and status["epsilon_budget"] == 3.0
    assert 0 < status["epsilon"] <= 3.0 and status["publishing"] == "budget_exhausted"
    text = agent.metrics.text().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["fedline_edge_rows_retired"] == 0  # retired rows are counted once a later round moves past
    assert values["fedline_edge_rows_eligible"] > 50
    assert (
        values["fedline_edge_epsilon_spent"] == status["epsilon"]
        or abs(values["fedline_edge_epsilon_spent"] - status["epsilon"]) < 1e-6
    )
    assert values["fedline_edge_epsilon_global_history"] >= values["fedline_edge_epsilon_spent"] - 1e-9
    assert values["fedline_edge_delta"] == 1e-5
    header, _ = open_update(agent.outbox.pending(900)[-1].blob, fed.aggregator, fed.enrollment)
    assert header.privacy["accounting"] == "per_record" and header.privacy["epsilon"] <= 3.0
    json.dumps(status)
    agent.close()


async def test_overlapping_windows_report_the_raw_sample_unit(tmp_path) -> None:
    _fed, agent = _agent(
        tmp_path,
        model={"kind": "mlp", "hidden": [6], "window": 4},
        rows={"window": 4, "stride": 2},
        training={"min_rows": 20},
        privacy={"epsilon": 1000.0},
    )
    assert agent.ledger is not None and agent.ledger.group == 2
    assert agent.status()["privacy_unit"].startswith("raw sample (in 2 overlapping windows")
    agent.close()


def _gauges(agent: EdgeAgent) -> dict[str, float]:
    text = agent.metrics.text().decode()
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


async def test_a_stream_keeps_publishing_where_one_global_accountant_would_stop(tmp_path) -> None:
    """The real agent on a stream: 80 new rows before every round, q and steps planned for a fixed 320 rows
    (q = 0.1, 10 steps, sigma 1.5). By Opacus's RDP accountant three such rounds cost 2.30 and four 2.59, so
    with a budget of 2.4 one accountant over the site's whole history passes it at round 4 and the pre-issue-21
    edge would have stopped for good. Per record, every row retires after its third round, new rows take
    its place, and the site publishes every round with no row over the budget."""
    budget = 2.4
    _fed, agent = _agent(
        tmp_path,
        privacy={"epsilon": budget, "noise_multiplier": 1.5},
        training={"every_rows": 0, "min_rows": 60, "batch_size": 32, "max_pending_per_base": 100, "plan_rows": 320},
    )
    await asyncio.wait_for(agent.ingest.run(), bound(20))
    x_all, y_all = agent.dataset.arrays()
    rng = np.random.default_rng(0)
    whole_history = []
    for rnd in range(1, 7):
        pick = rng.choice(len(x_all), 80, replace=False)  # the line's next 80 rows
        agent.dataset.add_many([(x_all[i], y_all[i]) for i in pick])
        assert await agent.train_once() is not None, f"round {rnd}: {agent.status()}"
        assert 0 < agent.epsilon <= budget, f"round {rnd}: a row at ε {agent.epsilon}"
        whole_history.append(_gauges(agent)["fedline_edge_epsilon_global_history"])
    assert agent.ledger is not None and agent.ledger.releases == 6
    assert whole_history[2] <= budget < whole_history[3], whole_history  # the global accountant stops at 4
    assert _gauges(agent)["fedline_edge_rows_retired"] > 0 and agent.status()["publishing"] == "ok"
    agent.close()
