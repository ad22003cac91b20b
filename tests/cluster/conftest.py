"""One private two-node RabbitMQ cluster for every test of this folder (starting one takes tens of seconds)."""

from __future__ import annotations

import pytest

from broker_bridge.rabbitmq import RabbitCluster, rabbitmq_available

FEDERATION = "test"
SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not rabbitmq_available():
        pytest.fail("this test needs rabbitmq-server: apt-get install rabbitmq-server (make test installs it as root)")
    c = RabbitCluster(tmp_path_factory.mktemp("rabbit"), federation=FEDERATION, sites=SITES)
    c.start()
    yield c
    c.stop()
