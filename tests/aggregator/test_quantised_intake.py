"""int8 updates at the aggregator: decoded before the checks, refused by name when malformed, stable across a restart."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from broker_bridge import quantised
from broker_bridge.rounding import private_rng
from tests.aggregator.helpers import make_federation, random_delta

STRATEGY = 'kind = "fedbuff"\nbuffer_size = 2\nmax_staleness = 1\nnorm_bound = 0\nclip_to_median = false'
EXTRA = "[validation]\nmax_norm = 5.0\nmax_samples = 1000"


@pytest.fixture
def fed(tmp_path):
    return make_federation(tmp_path, ["site-a", "site-b"])


def _core(fed) -> AggregatorCore:
    return AggregatorCore(fed.config(strategy=STRATEGY, extra=EXTRA))


def test_malformed_int8_updates_get_a_receipt_naming_the_fault_and_the_next_ones_apply(fed) -> None:
    core = _core(fed)
    try:
        rng = np.random.default_rng(0)
        base = {k: v.copy() for k, v in core.model.items()}
        good = quantised.encode(random_delta(core.model, rng), "int8", private_rng())
        name = next(iter(core.model))
        bad = {
            "nan": dict(good, **{f"{name}#scale": np.full_like(good[f"{name}#scale"], np.nan)}),
            "length": dict(good, **{f"{name}#scale": np.append(good[f"{name}#scale"], np.float32(0.1))}),
            "negative": dict(good, **{f"{name}#scale": -good[f"{name}#scale"]}),
            "missing": {k: v for k, v in good.items() if k != f"{name}#scale"},
        }
        receipts = {k: core.submit(fed.seal("site-a", t, 0, encoding="int8")[0]) for k, t in bad.items()}
        # an int8 block that says float32, and a float32 delta that says int8: refused too, by the check that sees it
        receipts["dtype"] = core.submit(fed.seal("site-a", good, 0)[0])
        receipts["unknown"] = core.submit(fed.seal("site-a", good, 0, encoding="int4")[0])
        for k, r in receipts.items():
            assert r["verdict"] == "rejected", (k, r)
            assert r["counter"] >= 1  # the header was read: the site can match the receipt to its update
        assert {k: r["reason"] for k, r in receipts.items()} == {
            "nan": "encoding",
            "length": "encoding",
            "negative": "encoding",
            "missing": "encoding",
            "dtype": "names",  # float32 checks see the #scale tensors as unknown names
            "unknown": "encoding",
        }
        assert "NaN" in receipts["nan"]["detail"] and f"{name}#scale" in receipts["length"]["detail"]
        assert core.metrics.value("fedline_aggregator_rejections_total", {"reason": "encoding"}) == 5
        # the service goes on: two good int8 updates make version 1, the mean of their dequantised deltas
        blob_a, _ = fed.seal("site-a", good, 0, encoding="int8")
        other = quantised.encode(random_delta(core.model, rng), "int8", private_rng())
        assert core.submit(blob_a)["verdict"] == "buffered"
        assert core.submit(fed.seal("site-b", other, 0, encoding="int8")[0])["verdict"] == "applied"
        assert core.version == 1
        for k in core.model:  # by hand: q * step per block, each site weighs 1/2 (K = 2, staleness 0)
            da = _by_hand(good[k], good[f"{k}#scale"])
            db = _by_hand(other[k], other[f"{k}#scale"])
            np.testing.assert_allclose(core.model[k], base[k] + (da + db) / 2, rtol=0, atol=1e-6)
    finally:
        core.close()


def _by_hand(q: np.ndarray, steps: np.ndarray) -> np.ndarray:
    flat = q.astype(np.float64).ravel()
    return (flat * np.repeat(steps.astype(np.float64), 1024)[: flat.size]).reshape(q.shape)


def test_a_buffered_int8_update_reads_back_bit_for_bit_after_a_restart(fed) -> None:
    core = _core(fed)
    try:
        delta = quantised.encode(random_delta(core.model, np.random.default_rng(1)), "int8", private_rng())
        assert core.submit(fed.seal("site-a", delta, 0, encoding="int8")[0])["verdict"] == "buffered"
        held = {k: v.copy() for k, v in core.buffer[0].delta.items()}
    finally:
        core.close()
    again = _core(fed)
    try:
        assert len(again.buffer) == 1
        for k, v in held.items():
            assert np.array_equal(again.buffer[0].delta[k], v)
        assert list(held) == list(again.model)  # float32, in the model's order, no #scale tensors
    finally:
        again.close()


def test_an_intake_worker_forwards_the_decoded_float32_delta(fed) -> None:
    """With [intake] workers the worker decodes; the reducer gets float32 and never decodes twice."""
    from aggregator.forward import open_forward, seal_forward
    from aggregator.opener import open_update
    from broker_bridge.keys import KeyPair

    cfg = fed.config(strategy=STRATEGY, extra=EXTRA)
    reference = {"body.0.weight": (8, 4), "body.0.bias": (8,)}
    delta = random_delta({k: np.zeros(s, np.float32) for k, s in reference.items()}, np.random.default_rng(2))
    wire = quantised.encode(delta, "int8", private_rng())
    blob, _ = fed.seal("site-a", wire, 0, encoding="int8")
    op = open_update(blob, cfg=cfg, keys=fed.agg, enrollment=fed.enrollment, reference=reference, max_norm=5.0)
    assert op.reason is None and op.tensors is not None
    for k, v in delta.items():
        assert op.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(op.tensors[k], _by_hand(wire[k], wire[f"{k}#scale"]).astype(np.float32))
        assert np.abs(op.tensors[k] - v).max() <= float(wire[f"{k}#scale"].max()) * (1 + 1e-6)
    worker = KeyPair.generate("worker", "intake-0")
    back = open_forward(seal_forward(op, worker, fed.agg.public().box_pub), fed.agg, {"intake-0": worker.public()})
    assert back.header is not None and back.header.encoding == "int8" and back.tensors is not None
    assert all(np.array_equal(back.tensors[k], op.tensors[k]) for k in delta)


async def test_over_mosquitto_a_malformed_int8_update_gets_a_sealed_receipt_and_the_service_goes_on(
    mosquitto, tmp_path
) -> None:
    """The aggregator service on a real broker: a NaN step is refused with a receipt the site opens (reason
    ``encoding``, its counter), counted; the site's next, good int8 update is applied."""
    import asyncio

    from aggregator.service import Aggregator
    from fedline.testing.patience import bound
    from tests.aggregator.test_service_broker import Site, broker_table
    from tests.conftest import eventually

    fed = make_federation(tmp_path / "fed", ["site-a", "site-b"])
    cfg = fed.config(
        strategy='kind = "fedbuff"\nbuffer_size = 1\nnorm_bound = 0\nclip_to_median = false',
        broker=broker_table(mosquitto),
        extra=f"{EXTRA}\n[publish]\nonnx = false",
    )
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    try:
        await eventually(lambda: agg.published_version == 0, 30)
        assert agg.core is not None
        good = quantised.encode(random_delta(agg.core.model, np.random.default_rng(4)), "int8", private_rng())
        name = next(iter(agg.core.model))
        bad = dict(good, **{f"{name}#scale": np.full_like(good[f"{name}#scale"], np.nan)})
        async with Site(fed, mosquitto, "site-a") as a:
            blob, h = fed.seal("site-a", bad, 0, encoding="int8")
            await a.send(blob, h.msg_id)
            await eventually(lambda: len(a.receipts) == 1, 30)
            r = a.receipts[0]
            assert (r["verdict"], r["reason"], r["counter"]) == ("rejected", "encoding", h.counter)
            assert f"{name}#scale" in r["detail"] and "NaN" in r["detail"]
            assert agg.core.metrics.value("fedline_aggregator_rejections_total", {"reason": "encoding"}) == 1
            blob, h2 = fed.seal("site-a", good, 0, encoding="int8")
            await a.send(blob, h2.msg_id)
            await eventually(lambda: len(a.receipts) == 2, 30)
            assert (a.receipts[1]["verdict"], a.receipts[1]["counter"]) == ("applied", h2.counter)
        assert agg.core.version == 1
    finally:
        agg.stop()
        await asyncio.wait_for(task, bound(30))
