"""The lost-data-directory messages (broker_bridge.recovery): who can forge or replay them."""

from __future__ import annotations

import pytest

from broker_bridge.errors import WireError
from broker_bridge.keys import Enrollment, KeyPair
from broker_bridge.recovery import RecoveryAnswer, open_answer, open_request, seal_answer, seal_request

FED = "plant"


@pytest.fixture(scope="module")
def parties():
    agg = KeyPair.generate("aggregator", "aggregator")
    a, b = KeyPair.generate("site", "site-a"), KeyPair.generate("site", "site-b")
    enr = Enrollment(FED, agg.public())
    enr.add(a.public())
    enr.add(b.public())
    return agg, a, b, enr


def answer(nonce: str, site: str = "site-a") -> RecoveryAnswer:
    return RecoveryAnswer(site, nonce, 41, 2.5, 41, [(0.03, 1.0, 34, 1, 41)])


def test_a_request_opens_only_for_the_enrolled_signer_on_its_own_topic(parties) -> None:
    agg, a, b, enr = parties
    blob = seal_request(FED, "n" * 32, a, agg.public().box_pub)
    assert open_request(blob, "site-a", agg, enr) == "n" * 32
    with pytest.raises(WireError) as e:  # site-b (or the broker) re-posts a's request on b's topic
        open_request(blob, "site-b", agg, enr)
    assert e.value.reason == "signature"
    stranger = KeyPair.generate("site", "site-a")  # a key with the right name, not the enrolled one
    with pytest.raises(WireError) as e:
        open_request(seal_request(FED, "n" * 32, stranger, agg.public().box_pub), "site-a", agg, enr)
    assert e.value.reason == "signature" and "enrolled key" in e.value.detail
    with pytest.raises(WireError) as e:  # sealed to another aggregator
        open_request(seal_request(FED, "n" * 32, a, b.public().box_pub), "site-a", agg, enr)
    assert e.value.reason == "decrypt"
    with pytest.raises(WireError) as e:
        open_request(blob, "site-c", agg, enr)
    assert e.value.reason == "unenrolled"


def test_an_answer_opens_only_for_its_site_its_nonce_and_the_aggregators_signature(parties) -> None:
    agg, a, b, _ = parties
    blob = seal_answer(answer("n" * 32), FED, agg, a.public().box_pub)
    got = open_answer(blob, a, agg.public().sign_pub, FED, "n" * 32)
    assert (got.last_counter, got.epsilon, got.releases, got.history) == (41, 2.5, 41, [(0.03, 1.0, 34, 1, 41)])
    with pytest.raises(WireError) as e:  # an old answer replayed to a later request
        open_answer(blob, a, agg.public().sign_pub, FED, "m" * 32)
    assert e.value.reason == "replay"
    with pytest.raises(WireError) as e:  # another site cannot read it (it tells a's counter and ε)
        open_answer(blob, b, agg.public().sign_pub, FED, "n" * 32)
    assert e.value.reason == "decrypt"
    with pytest.raises(WireError) as e:  # a site (anyone may seal to a's public key) forging an answer
        open_answer(seal_answer(answer("n" * 32), FED, b, a.public().box_pub), a, agg.public().sign_pub, FED, "n" * 32)
    assert e.value.reason == "signature"
    with pytest.raises(WireError) as e:  # an answer meant for b, sealed to a
        open_answer(
            seal_answer(answer("n" * 32, "site-b"), FED, agg, a.public().box_pub),
            a,
            agg.public().sign_pub,
            FED,
            "n" * 32,
        )
    assert e.value.reason == "schema"
