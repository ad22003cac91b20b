"""The plant's core on bytes: what its lines get, what goes upstream, and a restart between the two.

No broker: the plant's core takes sealed line updates (``AggregatorCore.process``) and queues
its reduces in a real outbox (``plant.uplink.Uplink.queue_delta``); the test opens the queued
update with the central aggregator's key, as the central aggregator would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.keys import Enrollment, KeyPair
from plant.config import parse_plant_config
from plant.core import PlantCore
from plant.uplink import Uplink
from tests.plant.tier import MODEL, federation_keys


def _config(root: Path, buffer_size: int = 2, quantise: str = "off"):
    federation_keys(root / "keys" / "plant-a", "plant-a", ["l1", "l2", "l3"])
    federation_keys(root / "keys" / "central", "central", ["plant-a"])
    kp, kc = root / "keys" / "plant-a", root / "keys" / "central"
    doc = {
        "aggregator": {
            "federation": "plant-a",
            "key_file": str(kp / "aggregator.key"),
            "enrollment_file": str(kp / "enrollment.json"),
            "state_dir": str(root / "state"),
            "workers": 1,
        },
        "model": MODEL,
        "strategy": {"kind": "fedbuff", "buffer_size": buffer_size, "min_sites": 1, "clip_to_median": False},
        "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "lr": 0.1, "batch_size": 32, "steps": 7},
        "upstream": {
            "site": "plant-a",
            "federation": "central",
            "key_file": str(kc / "plant-a.key"),
            "enrollment_file": str(kc / "enrollment.json"),
            "data_dir": str(root / "upstream"),
            "broker": {"url": "mqtt://127.0.0.1:1"},
            "update": {"quantise": quantise},
        },
    }
    return parse_plant_config(doc)


def _open(cfg, uplink: Uplink, root: Path):
    """The plant's core as ``fedline plant`` builds it."""
    return PlantCore(cfg.plant, queue_delta=uplink.queue_delta, queued_through=uplink.queued_through)


def _update(root: Path, line: str, counter: int, base: int, delta: dict, eps: float) -> bytes:
    keys = KeyPair.load(root / "keys" / "plant-a" / f"{line}.key")
    agg = Enrollment.load(root / "keys" / "plant-a" / "enrollment.json").aggregator
    h = UpdateHeader(
        site=line,
        counter=counter,
        msg_id=f"{line}-{counter}",
        base_version=base,
        n_samples=10,
        privacy={"mode": "dp-sgd", "epsilon": eps, "delta": 1e-5},
    )
    return envelope.seal_update(h, delta, keys, agg.box_pub)


def _queued(root: Path, uplink: Uplink) -> list[tuple[UpdateHeader, dict]]:
    central = KeyPair.load(root / "keys" / "central" / "aggregator.key")
    enr = Enrollment.load(root / "keys" / "central" / "enrollment.json")
    return [envelope.open_update(r.blob, central, enr) for r in uplink.outbox.rows()]


def test_a_reduce_goes_upstream_as_the_fedbuff_step_while_lines_keep_the_central_model(tmp_path):
    cfg = _config(tmp_path)
    uplink = Uplink(cfg.upstream, cfg.plant.model)
    core = _open(cfg, uplink, tmp_path)
    try:
        names = list(core.model)
        rng = np.random.default_rng(0)
        d1 = {k: rng.uniform(-0.01, 0.01, v.shape).astype(np.float32) for k, v in core.model.items()}
        d2 = {k: rng.uniform(-0.01, 0.01, v.shape).astype(np.float32) for k, v in core.model.items()}
        central5 = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in core.model.items()}

        assert core.process(_update(tmp_path, "l1", 1, 0, d1, 1.5)).receipt["verdict"] == "buffered"
        assert core.adopt(5, central5) == 1  # central version 5 becomes plant version 1; the buffer stays
        assert len(core.buffer) == 1 and core.snapshot[0] == 1
        decision = core.process(_update(tmp_path, "l2", 1, 1, d2, 2.5))
        assert decision.new_version == 2 and {r["verdict"] for r in decision.receipts} == {"applied"}
        assert core.snapshot[0] == 1  # lines are served the central model, not the plant's reduce

        [(header, delta)] = _queued(tmp_path, uplink)
        assert header.site == "plant-a" and header.base_version == 5 and header.n_samples == 20
        assert header.privacy == {"mode": "plant", "accounting": "per_line", "lines": 2, "epsilon": 2.5}
        for k in names:  # FedBuff (Nguyen et al. 2022): x + eta (1/K) sum f(s_i) delta_i, K = 2, s_i = 0, eta = 1
            np.testing.assert_allclose(delta[k], (d1[k] + d2[k]) / 2, atol=1e-7)
            np.testing.assert_allclose(core.model[k], central5[k] + (d1[k] + d2[k]) / 2, atol=1e-6)
    finally:
        core.close()
        uplink.close()


def test_a_quantised_uplink_sends_int8_that_decodes_to_the_reduce_within_one_step(tmp_path):
    """``[upstream.update] quantise = "int8"``: the plant's delta crosses the WAN as int8 values with a step
    per block of 1,024 values (block max / 127, broker_bridge.quantised); stochastic rounding is within one step."""
    from broker_bridge import quantised

    cfg = _config(tmp_path, quantise="int8")
    uplink = Uplink(cfg.upstream, cfg.plant.model)
    core = _open(cfg, uplink, tmp_path)
    try:
        rng = np.random.default_rng(1)
        d = [{k: rng.uniform(-0.01, 0.01, v.shape).astype(np.float32) for k, v in core.model.items()} for _ in "ab"]
        core.process(_update(tmp_path, "l1", 1, 0, d[0], 1.0))
        assert core.process(_update(tmp_path, "l2", 1, 0, d[1], 1.0)).new_version == 1
        [(header, tensors)] = _queued(tmp_path, uplink)
        assert header.encoding == "int8"
        decoded = quantised.decode(tensors, "int8")
        for k, v in core.model.items():
            assert tensors[k].dtype == np.int8 and tensors[k].shape == v.shape
            mean = ((d[0][k] + d[1][k]) / 2).reshape(-1)
            step = max(float(np.abs(mean[:1024]).max()), 1e-30) / 127  # the first block's step, by hand
            assert np.abs(decoded[k].reshape(-1)[:1024] - mean[:1024]).max() <= step * (1 + 1e-6), k
    finally:
        core.close()
        uplink.close()


def test_a_reduce_committed_but_not_queued_goes_upstream_once_after_a_restart(tmp_path):
    cfg = _config(tmp_path, buffer_size=1)
    uplink = Uplink(cfg.upstream, cfg.plant.model)
    refused: list[int] = []

    def crash(plant_version: int, *args) -> bool:  # the process dies before the outbox transaction
        refused.append(plant_version)
        return False

    core = PlantCore(cfg.plant, queue_delta=crash, queued_through=uplink.queued_through)
    zero = {k: np.zeros_like(v) for k, v in core.model.items()}
    central3 = {k: v + 0.5 for k, v in core.model.items()}
    core.adopt(3, central3)
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in zero.items()}
    assert core.process(_update(tmp_path, "l1", 1, 1, delta, 1.0)).new_version == 2
    assert refused == [2] and uplink.outbox.rows() == []
    core.close()

    core = _open(cfg, uplink, tmp_path)  # restart: the reduce above upstream_version is queued now
    try:
        assert core.snapshot[0] == 1 and core.central_version == 3 and core.upstream_of == {1: 3}
        [(header, sent)] = _queued(tmp_path, uplink)
        assert header.base_version == 3 and header.counter == 1
        for k in zero:
            np.testing.assert_allclose(sent[k], delta[k], atol=1e-7)
        assert core.queue_pending() == 0 and len(uplink.outbox.rows()) == 1  # never twice
        assert uplink.queued_through() == 2
    finally:
        core.close()
        uplink.close()


def test_a_plant_refuses_a_key_that_is_not_its_central_site_key(tmp_path):
    cfg = _config(tmp_path)
    import dataclasses

    from fedline.config import ConfigError

    wrong = dataclasses.replace(cfg.upstream, key_file=str(tmp_path / "keys" / "plant-a" / "l1.key"))
    with pytest.raises(ConfigError, match="not site 'plant-a'"):
        Uplink(wrong, cfg.plant.model)
