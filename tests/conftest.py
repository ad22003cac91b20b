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

#: Under pytest-xdist (``make test`` runs three workers, ``--dist loadgroup``): the tests of one group run on one
#: worker, one after another. Only the RabbitMQ cluster is grouped (its session fixture starts two nodes, tens of
#: seconds: once, not once per worker). Everything else is handed out one test at a time to whichever worker is
#: free, the longest first (``LONG_FIRST``), so the workers finish together.
XDIST_GROUPS = {
    "tests/cluster/": "rabbitmq-cluster",
}
#: path prefixes of the longest tests, started first in this order (longest processing time first). Measured with
#: ``pytest -n 2 --dist loadgroup --durations=60`` on the 2-vCPU VM, 2026-12-01; seconds per test in brackets.
#: xdist hands each worker a second unit before its first is done (then one more whenever it has two tests or fewer
#: left), so this order also decides which tests share a worker: on three workers the two demo runs are followed by
#: the ONNX export bench and kill9, and the capture (a third whole demo) follows the cluster's group instead of
#: running beside both demos.
LONG_FIRST = (
    "tests/demo/test_demo_run.py",  # two demo runs (76-93 each)
    "tests/cluster/",  # the cluster's group (start 25-37, then 9 + 8 + 3)
    "tests/models/test_bench_onnx_export.py",  # 46
    "tests/faults/test_kill9.py",  # 33
    "tests/hostile/test_capture.py",  # a third demo run (44-66)
    "tests/aggregator/test_service_broker.py",  # 31
    "tests/hostile/test_privacy_mia.py",  # 31
    "tests/ops/test_deploy_secrets_and_units.py",  # 25 (+ 9 of set-up)
    "tests/edge/test_start_cost.py",  # 24, 15, 13, 7
    "tests/faults/",  # 24, 21, 19, 16, 14
    "tests/ops/test_prediction_spool.py",  # 23 (a 20 s outage)
    "tests/adapters/test_opcua.py",  # 8 + 4 alone, up to 58 on a loaded machine
    "tests/packaging/test_install_roles.py",  # 19, 13
    "tests/hostile/test_attack_suite.py",  # 17
    "tests/edge/test_edge_agent.py",  # 16
    "tests/edge/test_edge_faults.py",  # 15
    "tests/plant/test_plant_tier.py",  # 14, 7
    "tests/aggregator/test_bench_scale.py",  # 13
    "tests/edge/test_line_export_graph.py",  # 12
    "tests/ops/test_status_json.py",  # 11
    "tests/aggregator/test_intake_workers.py",  # 11
    "tests/demo/test_audit_and_proxy.py",  # 10
    "tests/demo/test_dp_defaults.py",  # 10, 8
    "tests/edge/test_record_privacy.py",  # 9, 7
    "tests/aggregator/test_cli_broker.py",  # 9
    "tests/hostile/test_fuzz.py",  # 8, 8, 7, 7, 6
    "tests/secagg/test_secagg_kill9.py",  # 8
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
