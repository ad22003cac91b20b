"""Topic names: built and parsed in one place; unsafe site ids refused with a reason."""

from __future__ import annotations

import re

import pytest

from broker_bridge.errors import FedlineError, TopicError
from broker_bridge.topics import TopicInfo, Topics, validate_site_id

T = Topics("test")


def test_every_topic_parses_back_to_what_built_it() -> None:
    cases = {
        T.update_chunk("site-a", "m-1", 7): TopicInfo("update", site="site-a", msg_id="m-1", index=7),
        T.receipts("site-b"): TopicInfo("receipts", site="site-b"),
        T.status("site_c.2"): TopicInfo("status", site="site_c.2"),
        T.manifest(): TopicInfo("manifest"),
        T.weights_chunk(12, 3): TopicInfo("weights", version=12, index=3),
        T.onnx_chunk(12, 0): TopicInfo("onnx", version=12, index=0),
    }
    for topic, info in cases.items():
        assert topic.startswith("fedline/test/")
        assert T.parse(topic) == info


def test_filters_follow_design_layout() -> None:
    assert T.updates_filter() == "fedline/test/sites/+/update/#"
    assert T.model_filter() == "fedline/test/model/#"
    assert T.weights_filter() == "fedline/test/model/+/weights/#"
    assert Topics("plant-7", prefix="acme").manifest() == "acme/plant-7/model/manifest"


@pytest.mark.parametrize(
    "bad, why",
    [("", "non-empty"), ("a+b", "'+'"), ("line#1", "'#'"), ("a/b", "'/'"), ("+", "'+'"), ("#", "'#'"), ("/", "'/'")],
)
def test_reserved_characters_and_empty_site_ids_are_refused(bad: str, why: str) -> None:
    with pytest.raises(TopicError, match=re.escape(why)):
        validate_site_id(bad)
    for build in (
        lambda: T.receipts(bad),
        lambda: T.status(bad),
        lambda: T.update_chunk(bad, "m", 0),
        lambda: T.update_chunk("site-a", bad, 0),
        lambda: Topics(bad),
    ):
        with pytest.raises(TopicError):
            build()


@pytest.mark.parametrize("bad", ["site a", "sité", "-lead", "x" * 65, "ab\n", "a\x00b", None, 5])
def test_other_unsafe_ids_are_refused(bad: object) -> None:
    with pytest.raises(TopicError):
        validate_site_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "topic",
    [
        "fedline/other/model/manifest",  # another federation
        "fedline/test",
        "fedline/test/",
        "fedline/test/sites/site-a",
        "fedline/test/sites/site-a/update/m1",  # no index
        "fedline/test/sites/site-a/update/m1/x",
        "fedline/test/sites/site-a/update/m1/-1",
        "fedline/test/sites/site-a/update/m1/²",  # a unicode digit that int() refuses
        "fedline/test/sites/a+b/receipts",
        "fedline/test/sites/site-a/receipts/extra",
        "fedline/test/model/1/weights",
        "fedline/test/model/v1/weights/0",
        "fedline/test/model/1/pickle/0",
    ],
)
def test_foreign_or_malformed_topics_raise_topic_error(topic: str) -> None:
    with pytest.raises(TopicError) as info:
        T.parse(topic)
    assert isinstance(info.value, FedlineError)
    assert repr(topic) in str(info.value)  # the error names the topic it refused
