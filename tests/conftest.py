"""Shared fixtures: a real, private Mosquitto per test that asks for one.

Tests that use the ``mosquitto`` fixture are marked ``broker`` automatically,
so ``make test`` can say exactly which tests it cannot run on a machine
without Mosquitto (and never skips them silently).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from broker_bridge.client import BrokerSettings
from broker_bridge.mosquitto import MosquittoProcess, mosquitto_binary
from fedline.testing.patience import bound

SITES = ["site-a", "site-b", "site-c"]
FEDERATION = "test"


#: Under pytest-xdist (``make test`` runs two workers), the tests of one group run on one worker, one after
#: another: the RabbitMQ cluster is started once, and the tests that start whole federations of processes
#: (each importing torch) are split into two chains of about equal length, one per worker, so at most two
#: run at a time. The chains are collected first (``pytest_collection_modifyitems``): a long chain that
#: starts last would leave the other worker idle at the end of the run.
XDIST_GROUPS = {
    "tests/demo/test_demo_run.py": "federation-processes-a",
    "tests/ops/test_status_json.py": "federation-processes-a",
    "tests/faults/test_soak.py": "federation-processes-a",
    "tests/faults/test_broker_restart.py": "federation-processes-a",
    "tests/hostile/test_capture.py": "federation-processes-a",
    "tests/faults/": "federation-processes-b",
    "tests/secagg/test_secagg_kill9.py": "federation-processes-b",
    "tests/plant/test_plant_tier.py": "federation-processes-b",
    "tests/aggregator/test_intake_workers.py": "federation-processes-b",
    "tests/cluster/": "rabbitmq-cluster",
}
_GROUP_ORDER = {group: n for n, group in enumerate(dict.fromkeys(XDIST_GROUPS.values()))}


def _group(rel: str) -> str | None:
    """The xdist group of a test file (the first matching prefix), or None."""
    return next((group for prefix, group in XDIST_GROUPS.items() if rel.startswith(prefix)), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parent.parent
    groups: dict[int, str | None] = {}
    for item in items:
        if "mosquitto" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)
        group = _group(Path(str(item.path)).resolve().relative_to(root).as_posix())
        groups[id(item)] = group
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # the long chains first, in their order; then everything else as collected (a stable sort)
    items.sort(key=lambda it: _GROUP_ORDER.get(groups[id(it)] or "", len(_GROUP_ORDER)))


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A private Mosquitto with the generated config and ACL for federation 'test': a TLS listener
    (``tls_url``, used by :func:`settings_for`) and a plaintext one on loopback (``url``)."""
    if mosquitto_binary() is None:
        pytest.fail(
            "this test needs the mosquitto broker: apt-get install mosquitto (make test installs it when run as root)"
        )
    broker = MosquittoProcess(tmp_path / "broker", federation=FEDERATION, sites=SITES)
    broker.start()
    yield broker
    broker.stop()


_client_ids = itertools.count(1)


def settings_for(broker: MosquittoProcess, user: str, **kw) -> BrokerSettings:
    """Client settings that log in to ``broker`` as ``user`` (site id, 'aggregator' or 'observer'),
    over the broker's TLS listener (verified against the broker's generated CA)."""
    kw.setdefault("client_id", f"{user}-{next(_client_ids)}")
    kw.setdefault("backoff_min_s", 0.05)
    kw.setdefault("backoff_max_s", 0.5)
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("url", broker.tls_url)
    kw.setdefault("ca_file", broker.ca_file)
    return BrokerSettings(username=user, password=broker.password(user), **kw)


async def eventually(pred, timeout: float = 10.0, interval: float = 0.05):
    """Wait until ``pred()`` is true; fail the test with a clear message otherwise (after ``timeout`` times
    the patience factor: fedline.testing.patience)."""
    timeout = bound(timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = pred()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
