"""Intake without a broker: every refusal has its reason, a receipt and a counter; none stops the core."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from aggregator.config import load_config
from aggregator.core import AggregatorCore, StateError
from broker_bridge import envelope
from broker_bridge.envelope import UpdateHeader
from broker_bridge.errors import WireError
from broker_bridge.keys import KeyPair
from broker_bridge.mosquitto import free_port
from fedline.config import ConfigError
from tests.aggregator.helpers import SPEC_TOML, make_federation, random_delta


@pytest.fixture
def fed(tmp_path):
    return make_federation(tmp_path, ["site-a", "site-b"])


@pytest.fixture
def core(fed):
    c = AggregatorCore(
        fed.config(
            strategy='kind = "fedbuff"\nbuffer_size = 2\nmax_staleness = 1',
            extra="[validation]\nmax_norm = 5.0\nmax_samples = 1000",
        )
    )
    yield c
    c.close()


def test_each_bad_update_is_rejected_with_its_reason_and_the_good_ones_still_count(fed, core):
    rng = np.random.default_rng(0)
    good = lambda: random_delta(core.model, rng)
    refused = {}
    blob, _ = fed.seal("site-a", good(), 0)
    refused["decrypt"] = core.submit(blob[:-1] + bytes([blob[-1] ^ 1]))  # tampered ciphertext
    refused["framing"] = core.submit(b"\x00" * 100)
    stranger = KeyPair.generate("site", "site-z")
    refused["unenrolled"] = core.submit(
        envelope.seal_update(UpdateHeader("site-z", 1, "zz", 0, 5), good(), stranger, fed.agg.public().box_pub)
    )
    impostor = KeyPair.generate("site", "site-b")  # claims to be site-b with another key
    refused["unenrolled-key"] = core.submit(
        envelope.seal_update(UpdateHeader("site-b", 1, "zz", 0, 5), good(), impostor, fed.agg.public().box_pub)
    )
    other_agg = KeyPair.generate("aggregator", "other")
    refused["decrypt-other"] = core.submit(
        envelope.seal_update(
            UpdateHeader("site-a", 50, "zz", 0, 5), good(), fed.sites["site-a"], other_agg.public().box_pub
        )
    )
    with_head = dict(good(), **{"head.weight": np.zeros((1, 8), np.float32)})
    refused["names"] = core.submit(fed.seal("site-a", with_head, 0)[0])
    refused["dtype"] = core.submit(fed.seal("site-a", {k: v.astype(np.float64) for k, v in good().items()}, 0)[0])
    refused["samples"] = core.submit(fed.seal("site-a", good(), 0, n_samples=0)[0])
    refused["samples-big"] = core.submit(fed.seal("site-a", good(), 0, n_samples=1001)[0])
    refused["norm"] = core.submit(fed.seal("site-a", {k: v * 1e4 for k, v in good().items()}, 0)[0])
    inf = good()
    inf["body.0.weight"][0, 0] = np.inf
    refused["nonfinite"] = core.submit(fed.seal("site-a", inf, 0)[0])
    refused["base_version"] = core.submit(fed.seal("site-a", good(), 3)[0])
    assert {k: (r["verdict"], r["reason"]) for k, r in refused.items()} == {
        "decrypt": ("rejected", "decrypt"),
        "framing": ("rejected", "framing"),
        "unenrolled": ("rejected", "unenrolled"),
        "unenrolled-key": ("rejected", "unenrolled"),
        "decrypt-other": ("rejected", "decrypt"),
        "names": ("rejected", "names"),
        "dtype": ("rejected", "dtype"),
        "samples": ("rejected", "samples"),
        "samples-big": ("rejected", "samples"),
        "norm": ("rejected", "norm"),
        "nonfinite": ("rejected", "nonfinite"),
        "base_version": ("rejected", "base_version"),
    }
    assert "head.weight" in refused["names"]["detail"]
    # the service goes on: two good updates make version 1
    assert core.submit(fed.seal("site-a", good(), 0)[0])["verdict"] == "buffered"
    assert core.submit(fed.seal("site-b", good(), 0)[0])["verdict"] == "applied"
    assert core.version == 1
    m = core.metrics
    assert m.value("fedline_aggregator_rejections_total", {"reason": "samples"}) == 2
    assert m.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 2
    assert m.value("fedline_aggregator_updates_total", {"verdict": "applied"}) == 2


def test_duplicates_get_their_original_verdict_and_old_unknown_counters_are_replays(fed, core):
    rng = np.random.default_rng(1)
    b1, _ = fed.seal("site-a", random_delta(core.model, rng), 0, counter=5)
    first = core.submit(b1)
    assert first["verdict"] == "buffered"
    again = core.submit(b1)  # the receipt was lost; the site resends
    assert again == first
    # an update that arrives after a newer one was decided, never seen before: replay
    b0, _ = fed.seal("site-a", random_delta(core.model, rng), 0, counter=4)
    assert (core.submit(b0)["verdict"], core.submit(b0)["reason"]) == ("rejected", "replay")
    # the buffered one is applied when the buffer flushes; its duplicate now says so
    assert core.submit(fed.seal("site-b", random_delta(core.model, rng), 0)[0])["verdict"] == "applied"
    assert core.submit(b1)["verdict"] == "applied" and core.submit(b1)["version"] == 1
    # a rejected update resent is rejected again with the same reason (not "replay")
    bad, _ = fed.seal("site-a", random_delta(core.model, rng), 9, counter=6)
    assert core.submit(bad)["reason"] == "base_version" and core.submit(bad)["reason"] == "base_version"
    assert core.metrics.value("fedline_aggregator_duplicates_total") >= 3


def test_too_stale_updates_are_dropped_with_a_stale_receipt(fed, core):
    rng = np.random.default_rng(2)
    for _ in range(2):  # versions 1 and 2
        core.submit(fed.seal("site-a", random_delta(core.model, rng), core.version)[0])
        core.submit(fed.seal("site-b", random_delta(core.model, rng), core.version)[0])
    assert core.version == 2
    r = core.submit(fed.seal("site-a", random_delta(core.model, rng), 0)[0])
    assert (r["verdict"], r["reason"], r["staleness"]) == ("stale", "too_stale", 2)
    r = core.submit(fed.seal("site-a", random_delta(core.model, rng), 1)[0])
    assert r["verdict"] == "buffered" and r["staleness"] == 1


def test_parallel_open_gives_the_same_decisions_as_serial(fed, core):
    rng = np.random.default_rng(3)
    blobs = [fed.seal(["site-a", "site-b"][i % 2], random_delta(core.model, rng), i // 2)[0] for i in range(6)]
    decisions = core.process_many(blobs)
    assert [d.receipt["verdict"] for d in decisions] == ["buffered", "applied"] * 3
    assert core.version == 3


def test_receipts_are_signed_by_the_aggregator_and_sealed_to_their_site(fed, core):
    r = core.submit(fed.seal("site-a", random_delta(core.model, np.random.default_rng(4)), 0)[0])
    blob = core.sign_receipt(r)
    doc = envelope.open_receipt(blob, fed.sites["site-a"], fed.agg.public().sign_pub)
    assert doc == r
    with pytest.raises(WireError) as exc:  # another site (or the broker) cannot open it
        envelope.open_receipt(blob, fed.sites["site-b"], fed.agg.public().sign_pub)
    assert exc.value.reason == "decrypt"
    assert b"site-a" not in blob and b"applied" not in blob


def test_checkpoints_are_pruned_but_lineage_is_kept(fed):
    path = fed.write_config(strategy='kind = "fedasync"', state_dir="s2")
    text = path.read_text().replace("seed = 7", "seed = 7\nkeep_checkpoints = 2")
    path.write_text(text)
    core = AggregatorCore(load_config(path))
    rng = np.random.default_rng(5)
    for _ in range(5):
        core.submit(fed.seal("site-a", random_delta(core.model, rng), core.version)[0])
    assert core.store.kept_checkpoints() == [4, 5]
    assert core.lineage(1)["updates"][0]["site"] == "site-a"
    core.close()


def test_state_dir_of_another_model_is_refused(fed):
    core = AggregatorCore(fed.config())
    core.close()
    other = '\n[model]\nkind = "mlp"\nn_features = 6\nhidden = [8]\n'
    with pytest.raises(StateError, match="another state_dir"):
        AggregatorCore(fed.config(spec=other))
    path = fed.write_config()
    path.write_text(path.read_text().replace("seed = 7", "seed = 8"))
    with pytest.raises(StateError, match="seeded with seed 7"):
        AggregatorCore(load_config(path))


def test_config_errors_name_the_file_and_key(fed):
    with pytest.raises(ConfigError, match=r"aggregator.toml: strategy.kind: expected one of"):
        fed.config(strategy='kind = "fedprox"')
    with pytest.raises(ConfigError, match=r"strategy: robust = 'median' needs several updates"):
        fed.config(strategy='kind = "fedasync"\nrobust = "median"')
    with pytest.raises(ConfigError, match=r"validation.max_nrom: unknown key"):
        fed.config(extra="[validation]\nmax_nrom = 3.0")
    with pytest.raises(ConfigError, match=r"broker.*url"):
        fed.config(broker='[broker]\nurl = "http://x"')
    with pytest.raises(ConfigError, match=r"aggregator.toml: aggregator: keep_verdicts must be at least 10 .*got 3"):
        fed.config(spec="keep_verdicts = 3\n" + SPEC_TOML)
    cfg = fed.config()
    assert cfg.aggregator.state_dir == str(fed.root / "state")  # relative to the file


def test_prometheus_endpoint_serves_the_aggregator_metrics(fed, core):
    core.submit(fed.seal("site-a", random_delta(core.model, np.random.default_rng(6)), 0)[0])
    core.submit(b"junk" * 20)
    port = free_port()
    core.metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "fedline_aggregator_model_version",
        "fedline_aggregator_staleness_bucket",
        "fedline_aggregator_buffer_fill 1.0",
        'fedline_aggregator_rejections_total{reason="framing"} 1.0',
        "fedline_aggregator_updates_per_second",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_objects_collected_total",
    ):
        assert name in text


def test_the_example_config_parses():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "aggregator" / "aggregator.example.toml")
    assert cfg.strategy.kind == "fedbuff" and cfg.model.personal == ["head."]
    assert cfg.aggregator.state_dir.endswith("aggregator/state")


def test_cli_reports_a_config_error_with_exit_code_78(fed, capsys):
    from fedline.cli import main

    path = fed.write_config(strategy='kind = "fedasync"\nbuffer_sise = 3')
    assert main(["aggregator", "--config", str(path)]) == 78
    err = capsys.readouterr().err
    assert "aggregator.toml: strategy.buffer_sise: unknown key" in err
    assert main(["status", "--config", str(fed.root / "missing.toml")]) == 78
    assert "missing.toml" in capsys.readouterr().err


def test_buffer_timeout_reduces_a_partial_buffer_and_applies_every_update_in_it(fed):
    """With buffer_timeout_s a buffer short of K is reduced with what it holds; without it, it waits."""
    rng = np.random.default_rng(3)
    waits = AggregatorCore(fed.config(strategy='kind = "fedbuff"\nbuffer_size = 3', state_dir="s0"))
    try:
        waits.submit(fed.seal("site-a", random_delta(waits.model, rng), 0)[0])
        assert waits.flush_due_in() is None and waits.version == 0  # no timeout: wait for K
    finally:
        waits.close()
    # three sites: MDA (the default) awaits all three and sums K = 2 (one left out when three arrive)
    three = make_federation(fed.root / "three", ["site-a", "site-b", "site-c"])
    c = AggregatorCore(
        three.config(
            strategy='kind = "fedbuff"\nbuffer_size = 3\nbuffer_timeout_s = 30\nclip_to_median = false', state_dir="s1"
        )
    )
    fed = three
    try:
        assert c.flush_due_in() is None and c.flush() is None  # nothing buffered: nothing to do
        before = {k: v.copy() for k, v in c.model.items()}
        deltas = [random_delta(c.model, rng) for _ in range(2)]
        receipts = [
            c.submit(fed.seal(s, d, 0, n_samples=n)[0])
            for s, d, n in [("site-a", deltas[0], 30), ("site-b", deltas[1], 10)]
        ]
        assert [r["verdict"] for r in receipts] == ["buffered", "buffered"]
        due = c.flush_due_in()
        assert due is not None and 25 < due <= 30
        decision = c.flush()
        assert decision is not None and decision.new_version == 1 and c.version == 1 and not c.buffer
        assert sorted((r["site"], r["verdict"]) for r in decision.receipts) == [
            ("site-a", "applied"),
            ("site-b", "applied"),
        ]
        # FedBuff: (1/K) sum f(s) delta with K = 2 and s = 0, whatever the sample counts; two slots received, so MDA
        # can leave neither out (it needs 2f + 1 = 3) and both are summed at their fair share 1/K
        for k in before:
            np.testing.assert_allclose(c.model[k], before[k] + (deltas[0][k] + deltas[1][k]) / 2, atol=1e-6)
        assert c.metrics.value("fedline_aggregator_buffer_timeouts_total") == 1
        assert c.metrics.value("fedline_aggregator_updates_total", {"verdict": "applied"}) == 2
        assert c.flush_due_in() is None
        assert [u["site"] for u in c.lineage(1)["updates"]] == ["site-a", "site-b"]
    finally:
        c.close()


def test_buffer_timeout_must_not_be_negative(fed):
    with pytest.raises(ConfigError, match="buffer_timeout_s"):
        fed.config(strategy="buffer_timeout_s = -1")
