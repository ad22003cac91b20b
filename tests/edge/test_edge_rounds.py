"""Agent rounds without a broker: the privacy budget, privacy off, outbox policy, config errors."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import numpy as np
import pytest

from broker_bridge.envelope import open_update
from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.config import ConfigError
from fedline.testing.patience import bound
from tests.edge.helpers import Federation, write_csv, write_site

SITE = "site-a"
NOWHERE = "mqtt://127.0.0.1:9"  # nothing listens: these agents never connect


def _agent(tmp_path, **kw) -> tuple[Federation, EdgeAgent]:
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 240)
    path = write_site(fed, SITE, csv, NOWHERE, None, **kw)
    return fed, EdgeAgent(load_edge_config(path))


async def _ingest(agent: EdgeAgent) -> None:
    await asyncio.wait_for(agent.ingest.run(), bound(20))


async def test_budget_stops_publication_at_the_configured_epsilon(tmp_path) -> None:
    _fed, agent = _agent(tmp_path, privacy={"epsilon": 3.0, "noise_multiplier": 1.5})
    await _ingest(agent)
    sealed = []
    for _ in range(30):
        msg_id = await agent.train_once()
        if msg_id is None:
            break
        sealed.append(msg_id)
    assert len(sealed) == 3
    assert agent.publishing == "budget_exhausted"
    assert 2.0 < agent.epsilon <= 3.0  # three rounds fit (ε ≈ 2.8), a fourth would not (≈ 3.2)
    ledger = agent.outbox.ledger()
    assert [e.msg_id for e in ledger] == sealed
    assert all(e.epsilon is not None and e.epsilon <= 3.0 for e in ledger)
    status = agent.status()
    assert status["publishing"] == "budget_exhausted" and status["epsilon"] <= 3.0
    assert agent.metrics.budget_exhausted._value.get() == 1
    spent = agent.epsilon
    agent.close()

    # after a restart the accountant remembers: still exhausted, nothing more is sealed
    again = EdgeAgent(agent.cfg)
    assert again.epsilon == pytest.approx(spent, rel=1e-12)
    assert await again.train_once() is None
    assert again.publishing == "budget_exhausted"
    assert len(again.outbox.ledger()) == len(sealed)
    again.close()


async def test_privacy_off_is_explicit_warned_and_personal_head_never_sealed(tmp_path, caplog) -> None:
    fed, agent = _agent(tmp_path, privacy="off")
    assert agent.dp is None and agent.ledger is None
    with caplog.at_level(logging.WARNING, logger="fedline.edge"):
        agent.status_publisher.announce()
    assert any(r.getMessage() == "privacy.off" and r.levelno == logging.WARNING for r in caplog.records)
    await _ingest(agent)
    assert await agent.train_once() is not None
    (row,) = agent.outbox.pending(900)
    header, tensors = open_update(row.blob, fed.aggregator, fed.enrollment)
    assert header.privacy == {"mode": "off"}
    assert set(tensors) == set(agent.shared_names)
    assert not any(n.startswith("head.") for n in tensors)
    # the trained head stays at the site and is kept on disk
    assert set(agent.store.load_personal()) == {"head.weight", "head.bias"}
    agent.close()


async def test_personal_parameters_never_leave_for_every_model_kind(tmp_path) -> None:
    """A GRU over windows with a personal head and a personal first layer: neither is in the payload."""
    fed, agent = _agent(
        tmp_path,
        model={"kind": "gru", "hidden": [6, 5], "window": 4, "personal": ["head.", "dense."]},
        rows={"window": 4, "stride": 4},
        training={"min_rows": 20},
    )
    await _ingest(agent)
    assert await agent.train_once() is not None
    (row,) = agent.outbox.pending(900)
    _, tensors = open_update(row.blob, fed.aggregator, fed.enrollment)
    assert set(tensors) == {"body.weight_ih_l0", "body.bias_ih_l0", "body.weight_hh_l0", "body.bias_hh_l0"}
    agent.close()


async def test_receipts_and_bad_messages(tmp_path, caplog) -> None:
    """A signed 'rejected' receipt clears the row and is logged with its reason; forged receipts,
    garbage manifests and chunks are counted and dropped, and the agent carries on."""
    from broker_bridge.client import Message
    from broker_bridge.envelope import seal_receipt
    from broker_bridge.keys import KeyPair

    fed, agent = _agent(tmp_path, privacy="off")
    await _ingest(agent)
    await agent.train_once()
    await agent.train_once()
    rows = agent.outbox.pending(900)
    t = agent.topics
    doc = {
        "site": SITE,
        "counter": rows[0].counter,
        "msg_id": rows[0].msg_id,
        "verdict": "rejected",
        "reason": "norm above bound",
        "version": 4,
    }
    box = fed.enrollment.sites[SITE].box_pub
    forged = seal_receipt(
        {**doc, "counter": rows[1].counter, "msg_id": rows[1].msg_id}, KeyPair.generate("aggregator", "aggregator"), box
    )
    with caplog.at_level(logging.WARNING, logger="fedline.edge"):
        await agent.handle_message(Message(t.receipts(SITE), forged))
        await agent.handle_message(Message(t.receipts(SITE), b"\x00garbage"))
        await agent.handle_message(Message(t.receipts(SITE), seal_receipt(doc, fed.aggregator, box)))
        await agent.handle_message(Message(t.manifest(), b"FLM\x01" + bytes(100)))
        await agent.handle_message(Message(t.weights_chunk(9, 0), b"FLC1\xff"))
        await agent.handle_message(Message("fedline/test/elsewhere", b"x"))
    assert [r.counter for r in agent.outbox.pending(900)] == [rows[1].counter]  # forged receipt cleared nothing
    first = agent.outbox.ledger()[0]
    assert (first.state, first.reason, first.version) == ("rejected", "norm above bound", 4)
    assert any(
        r.getMessage() == "receipt.rejected" and r.fields["reason"] == "norm above bound" for r in caplog.records
    )
    assert agent.metrics.malformed.labels("receipt")._value.get() == 2
    assert agent.metrics.malformed.labels("weights")._value.get() == 1
    assert agent.metrics.malformed.labels("topic")._value.get() == 1
    assert agent.metrics.models_refused._value.get() == 1
    assert agent.base.version == 0
    assert await agent.train_once() is not None  # still working
    agent.close()


async def test_autoencoder_site_trains_without_labels(tmp_path) -> None:
    fed, agent = _agent(
        tmp_path,
        privacy="off",
        rows={"label": None},
        model={"kind": "autoencoder", "task": "anomaly", "hidden": [4, 2]},
    )
    await _ingest(agent)
    assert await agent.train_once() is not None
    (row,) = agent.outbox.pending(900)
    _, tensors = open_update(row.blob, fed.aggregator, fed.enrollment)
    assert tensors and all(n.startswith("body.") for n in tensors)  # the decoder (head) stays home
    agent.close()


async def test_stop_training_policy_stops_rounds_when_the_outbox_is_full(tmp_path) -> None:
    _, agent = _agent(tmp_path, privacy="off", outbox={"max_count": 2, "policy": "stop_training"})
    await _ingest(agent)
    assert await agent.train_once() is not None
    assert await agent.train_once() is not None
    assert await agent.train_once() is None
    assert agent.publishing == "outbox_full"
    assert agent.outbox.depth()[0] == 2 and agent.outbox.last_counter() == 2
    agent.close()


async def test_drop_oldest_policy_drops_counts_and_logs(tmp_path, caplog) -> None:
    _, agent = _agent(tmp_path, privacy="off", outbox={"max_count": 2, "policy": "drop_oldest"})
    await _ingest(agent)
    with caplog.at_level(logging.WARNING, logger="fedline.edge"):
        for _ in range(3):
            assert await agent.train_once() is not None
    assert [r.counter for r in agent.outbox.pending(900)] == [2, 3]
    assert agent.metrics.dropped._value.get() == 1
    assert [e.state for e in agent.outbox.ledger()] == ["dropped", "queued", "queued"]
    assert any(r.getMessage() == "outbox.dropped" for r in caplog.records)
    agent.close()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"model": {"n_features": 4}}, "model"),
        ({"model": {"kind": "autoencoder", "task": "anomaly", "personal": []}}, "rows.label"),
        ({"privacy": "of"}, "privacy"),
        ({"outbox": {"policy": "drop_newest"}}, "outbox.policy"),
        ({"training": {"epochs": 0}}, "training"),
    ],
)
def test_bad_site_config_names_the_key(tmp_path, change, key) -> None:
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 10)
    path = write_site(fed, SITE, csv, NOWHERE, None, **change)
    with pytest.raises(ConfigError) as info:
        load_edge_config(path)
    assert info.value.key == key
    assert info.value.file == str(path)


def test_personal_prefix_typo_is_a_config_error(tmp_path) -> None:
    fed = Federation.create(tmp_path, [SITE])
    path = write_site(fed, SITE, write_csv(tmp_path / "rows.csv", 10), NOWHERE, None, model={"personal": ["heads."]})
    with pytest.raises(ConfigError) as info:
        EdgeAgent(load_edge_config(path))
    assert info.value.key == "model.personal" and "heads." in info.value.message


def test_edge_package_import_stays_light() -> None:
    """edge.inference lives under edge/: importing edge (and the CLI registration) must not load torch."""
    code = (
        "import sys, edge, edge.cli, edge.config; "
        "assert not {'torch', 'opacus', 'onnx'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=bound(60))


def test_cli_check_and_config_error_exit_codes(tmp_path) -> None:
    fed = Federation.create(tmp_path, [SITE])
    csv = write_csv(tmp_path / "rows.csv", 10)
    good = write_site(fed, SITE, csv, NOWHERE, None)
    ok = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "edge", "--config", str(good), "--check"],
        capture_output=True,
        text=True,
        timeout=bound(60),
    )
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = write_site(fed, SITE, csv, NOWHERE, None, training={"batch_size": "big"})
    err = subprocess.run(
        [sys.executable, "-m", "fedline.cli", "edge", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=bound(60),
    )
    assert err.returncode == 78  # EX_CONFIG
    assert "training.batch_size" in err.stderr and str(bad) in err.stderr
    _ = np  # keep numpy imported for symmetry with other edge tests


async def test_rows_stored_while_a_round_selects_its_rows_stay_new_for_the_next_round(tmp_path) -> None:
    """Regression: the round counted rows stored during its (threaded) selection as consumed, so with
    ``every_rows`` the next round waited for the ``every_s`` timer (seen under load in the full suite)."""
    _fed, agent = _agent(tmp_path)
    await _ingest(agent)
    assert agent.new_rows == 240
    x, y = agent.dataset.arrays()
    late_rows = [(x[i], None if y is None else y[i]) for i in range(10)]
    select = agent.rounds._rows

    async def rows_while_ten_more_arrive():  # the ingest task runs on the loop while the round selects
        chosen = await select()
        agent.ingest.store(late_rows, [None] * 10, [False] * 10)
        return chosen

    agent.rounds._rows = rows_while_ten_more_arrive  # type: ignore[method-assign]
    assert await agent.train_once() is not None
    assert agent.new_rows == 10  # the 240 this round answered are consumed; the 10 are not
    assert len(agent.dataset) == 250
    agent.close()
