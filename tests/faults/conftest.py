"""Fault-suite helpers: every scenario prints its figures and, when ``FEDLINE_FAULT_FIGURES`` names a
file, appends them there as one JSON line (that is how RELIABILITY.md's tables were made)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from broker_bridge.mosquitto import mosquitto_binary


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath).replace(os.sep, "/")
        if "tests/faults/" in path and not path.endswith("test_tools.py"):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(autouse=True)
def _needs_mosquitto(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("broker") and mosquitto_binary() is None:
        pytest.fail("the fault suite needs the mosquitto broker: apt-get install mosquitto")


def record(scenario: str, **figures: Any) -> dict[str, Any]:
    doc = {"scenario": scenario, **figures}
    print("FIGURES", json.dumps(doc, default=str))
    path = os.environ.get("FEDLINE_FAULT_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(doc, default=str) + "\n")
    return doc
