"""The one observer of the wire (``broker_bridge.observer``): what it reads with no keys and with a site's."""

from __future__ import annotations

from dataclasses import dataclass

from broker_bridge.envelope import seal_receipt, sign_manifest
from broker_bridge.federation_key import new_content_key, seal_grant, seal_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.observer import Observer
from broker_bridge.topics import Topics

AGG = KeyPair.generate("aggregator", "aggregator")
A = KeyPair.generate("site", "site-a")
B = KeyPair.generate("site", "site-b")
T = Topics("plant")


@dataclass
class Msg:
    topic: str
    payload: bytes


def receipt(site: KeyPair, counter: int, verdict: str, staleness: int | None = 0) -> bytes:
    doc = {
        "site": site.ident,
        "counter": counter,
        "msg_id": f"m{counter}",
        "verdict": verdict,
        "reason": None,
        "version": 1,
        "staleness": staleness,
    }
    return seal_receipt(doc, AGG, site.public().box_pub)


def manifest(version: int, epoch: int, key: bytes) -> bytes:
    doc = {
        "federation": "plant",
        "version": version,
        "epoch": epoch,
        "created_at": 1.0,
        "spec": {"kind": "mlp"},
        "weights": {"hash": "ab" * 32, "size": 1, "chunks": 1, "msg_id": f"w{version}"},
        "onnx": {"hash": "cd" * 32, "size": 1, "chunks": 1, "msg_id": f"o{version}"},
    }
    return seal_manifest(sign_manifest(doc, AGG), version, epoch, key)


def test_without_keys_it_reads_statuses_and_model_headers_and_counts_sealed_receipts() -> None:
    obs = Observer(T, ["site-a"])
    key = new_content_key()
    for m in [
        Msg(T.status("site-a"), b'{"state": "online", "version": 3, "epsilon": 1.5, "outbox_depth": 4}'),
        Msg(T.status("site-a"), b'{"state": "offline"}'),  # its last will: the figures before it stay
        Msg(T.status("site-b"), b"not json"),  # a site not enrolled yet is shown; the payload counted as bad
        Msg(T.manifest(), manifest(5, 2, key)),
        Msg(T.manifest(), manifest(4, 2, key)),  # an older retained one arriving late does not go back
        Msg(T.receipts("site-a"), receipt(A, 1, "applied")),
        Msg(T.receipts("site-a"), receipt(A, 2, "stale")),
        Msg(T.service_status("aggregator"), b'{"state": "online"}'),
        Msg("fedline/plant/nowhere/x/y", b"x"),
        Msg(T.status("site-a"), b""),  # a cleared retained message: nothing
    ]:
        obs.on_message(m)
    v = obs.view
    a = v.sites["site-a"]
    assert a.status == {"state": "offline", "version": 3, "epsilon": 1.5, "outbox_depth": 4}
    assert a.max_outbox_depth == 4
    assert a.receipts["sealed"] == 2 and a.verdicts == {}  # sealed to site-a: counted, not read
    assert v.sites["site-b"].status == {"state": "not json"}
    assert v.model == {"version": 5, "epoch": 2} and v.version == 5 and v.manifests == {}
    assert v.services == {"aggregator": {"state": "online"}}
    assert v.malformed == 2  # the non-JSON status and the unknown topic


def test_with_site_keys_it_reads_their_receipts_and_the_models_and_follows_only_its_sites() -> None:
    obs = Observer(T, ["site-a"], only_sites=True, aggregator_sign_pub=AGG.public().sign_pub, site_keys={"site-a": A})
    key = new_content_key()
    obs.on_message(Msg(T.manifest(), manifest(1, 1, key)))  # before the grant: kept until its key arrives
    assert obs.view.manifests == {}
    obs.on_message(Msg(T.fedkey("site-a"), seal_grant("plant", A.public(), 1, key, AGG)))
    assert set(obs.view.manifests) == {1}
    obs.on_message(Msg(T.receipts("site-a"), receipt(A, 1, "applied", 2)))
    obs.on_message(Msg(T.receipts("site-a"), receipt(A, 1, "stale", 9)))  # a resend's receipt: its first verdict
    obs.on_message(Msg(T.receipts("site-a"), receipt(B, 1, "applied")))  # sealed to another site: unreadable
    obs.on_message(Msg(T.status("site-b"), b'{"state": "online"}'))  # not followed
    a = obs.view.sites["site-a"]
    assert {c: r["verdict"] for c, r in a.verdicts.items()} == {1: "applied"} and a.staleness == [2]
    assert obs.view.totals()["applied"] == 1 and a.receipts["sealed"] == 3
    assert set(obs.view.sites) == {"site-a"} and obs.view.malformed == 1
