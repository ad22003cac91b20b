"""Shared fixtures: a real, private Mosquitto per test that asks for one.

Tests that use the ``mosquitto`` fixture are marked ``broker`` automatically,
so ``make test`` can say exactly which tests it cannot run on a machine
without Mosquitto (and never skips them silently).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import pytest

from broker_bridge.client import BrokerSettings
from broker_bridge.mosquitto import MosquittoProcess, mosquitto_binary
from fedline.testing.patience import bound

SITES = ["site-a", "site-b", "site-c"]
FEDERATION = "test"


#: Tests started as whole processes of ``fedline`` (the fault rig, the plant tier, the demo) are forks of one
#: warm parent per test process, which imported torch once (fedline.testing.forkserver): each start costs
#: milliseconds instead of seconds of CPU. Production and ``make demo`` never set this.
os.environ.setdefault("FEDLINE_LAUNCH_FORKSERVER", "1")

#: Under pytest-xdist (``make test`` runs two workers, ``--dist loadgroup``): the tests of one group run on one
#: worker, one after another. Only the RabbitMQ cluster is grouped (its session fixture starts two nodes, tens of
#: seconds: once, not once per worker). Everything else is handed out one test at a time to whichever worker is
#: free, the longest first (``LONG_FIRST``), so both workers stay busy to the end. Two workers run at most two
#: whole federations at a time, which is what the 2-core CI machine can take.
XDIST_GROUPS = {
    "tests/cluster/": "rabbitmq-cluster",
}
#: path prefixes of the longest tests (measured: ``pytest --durations``), started first in this order
LONG_FIRST = (
    "tests/demo/test_demo_run.py",
    "tests/hostile/test_capture.py",
    "tests/cluster/",
    "tests/adapters/test_opcua.py",
    "tests/faults/",
    "tests/ops/test_status_json.py",
    "tests/secagg/test_secagg_kill9.py",
    "tests/models/test_bench_onnx_export.py",
    "tests/ops/test_deploy_secrets_and_units.py",
    "tests/plant/test_plant_tier.py",
    "tests/aggregator/test_cli_broker.py",
    "tests/edge/test_edge_faults.py",
    "tests/aggregator/test_intake_workers.py",
)


def _prefix_index(rel: str, prefixes) -> int | None:
    return next((n for n, prefix in enumerate(prefixes) if rel.startswith(prefix)), None)


def _group(rel: str) -> str | None:
    """The xdist group of a test file (the first matching prefix), or None."""
    n = _prefix_index(rel, tuple(XDIST_GROUPS))
    return None if n is None else list(XDIST_GROUPS.values())[n]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).resolve().parent.parent
    order: dict[int, int] = {}
    for item in items:
        if "mosquitto" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)
        rel = Path(str(item.path)).resolve().relative_to(root).as_posix()
        group = _group(rel)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        first = _prefix_index(rel, LONG_FIRST)
        order[id(item)] = len(LONG_FIRST) if first is None else first
    items.sort(key=lambda it: order[id(it)])  # the longest first; everything else as collected (a stable sort)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` as documented, on pytest 9: xdist 3.8 tags a grouped test by rewriting
    ``item._nodeid``, which pytest 9 no longer reads, so every group silently fell apart (the cluster started
    on both workers). This scheduler groups by the test's path instead, and keeps the collection order above
    (not xdist's "largest group first")."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class PathGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid.split("::", 1)[0]) or nodeid

    config.option.loadscopereorder = False
    return PathGroupScheduling(config, log)


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
