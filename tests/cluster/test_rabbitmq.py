"""RabbitMQ as a federation's broker: topic permissions equal to the Mosquitto ACL, and a real two-node cluster.

The cluster tests start Debian's rabbitmq-server themselves (two nodes on
loopback ports, joined into one cluster, MQTT plugin on); `make test`
installs it when run as root.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiomqtt
import pytest

from broker_bridge.mosquitto import render_acl
from broker_bridge.rabbitmq import RabbitCluster, filter_regex, parse_acl, topic_permissions
from broker_bridge.topics import Topics
from fedline.testing.patience import bound

SITES = ["site-a", "site-b", "site.c"]


def _match(regex: str, key: str) -> bool:
    return re.search(regex, key) is not None


def test_filter_regex_maps_mqtt_filters_to_routing_keys() -> None:
    # MQTT topic a/b.c/d is routing key a.b/c.d under RabbitMQ's MQTT plugin.
    r = filter_regex("fedline/f/sites/%u/update/#", "site.c")
    assert _match(r, "fedline.f.sites.site/c.update.m1.0")
    assert _match(r, "fedline.f.sites.site/c.update")  # '#' covers the parent level too
    assert not _match(r, "fedline.f.sites.site-a.update.m1.0")
    assert not _match(r, "fedline.f.sites.siteXc.update.m1.0")  # the '.' of the id is not a wildcard
    plus = filter_regex("fedline/f/sites/+/status", "x")
    assert _match(plus, "fedline.f.sites.site-b.status")
    assert _match(plus, "fedline.f.sites.*.status")  # a subscription's binding key
    assert not _match(plus, "fedline.f.sites.a.b.status")


def test_topic_permissions_confine_each_site_as_the_acl_does() -> None:
    perms = topic_permissions(Topics("f"), SITES)
    write_a, read_a = perms["site-a"]
    assert _match(write_a, "fedline.f.sites.site-a.update.m1.0")
    assert _match(write_a, "fedline.f.sites.site-a.status")
    assert not _match(write_a, "fedline.f.sites.site-b.update.m1.0")
    assert not _match(write_a, "fedline.f.model.manifest")
    assert not _match(write_a, "fedline.f.sites.site-a.receipts")  # receipts are the aggregator's to write
    assert _match(read_a, "fedline.f.model.#")
    assert _match(read_a, "fedline.f.sites.site-a.receipts")
    assert not _match(read_a, "fedline.f.sites.site-b.receipts")
    assert not _match(read_a, "fedline.f.sites.*.receipts")
    assert not _match(read_a, "fedline.#")
    write_g, read_g = perms["aggregator"]
    assert _match(read_g, "fedline.f.sites.*.update.#")
    assert _match(write_g, "fedline.f.model.3.weights.0")
    # the aggregator writes update topics only to clear a retained message a site parked there (issue 13);
    # it cannot forge an update by it (updates are signed by the site's key, and it is their only reader)
    assert _match(write_g, "fedline.f.sites.site-a.update.m1.0")
    assert not _match(perms["site-b"][0], "fedline.f.sites.site-a.update.m1.0")  # no site writes another's
    # every rule of the ACL is accounted for: one rule per generated line
    assert len(parse_acl(render_acl(Topics("f")))) == sum(
        1 for line in render_acl(Topics("f")).splitlines() if line.startswith(("topic", "pattern"))
    )


def test_parse_acl_refuses_lines_it_does_not_know() -> None:
    from broker_bridge.errors import FedlineError

    with pytest.raises(FedlineError, match="not one fedline writes"):
        parse_acl("user x\ntopic deny a/b\n")
    with pytest.raises(FedlineError, match="anonymous"):
        parse_acl("topic read a/#\n")


def _client(cluster: RabbitCluster, node: int, user: str, ident: str, timeout: float = 10) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        cluster.members[node].mqtt_port,
        username=user,
        password=cluster.password(user),
        identifier=ident,
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=timeout,
    )


#: a client that breaks a permission: RabbitMQ closes its connection, which aiomqtt reports only when the pending
#: PUBACK / SUBACK times out; the refusal itself is checked in the node's log (:func:`_refused`)
REFUSED_TIMEOUT_S = 3.0


def _refused(cluster: RabbitCluster, node: int, routing_key: str, user: str, timeout: float = 10.0) -> bool:
    """Whether ``node`` logged refusing ``user`` access to ``routing_key`` (its topic permissions said no); waits
    up to ``timeout`` (times the patience factor) for the node's log to reach its file."""
    member = cluster.members[node]
    line = f"access to topic '{routing_key}' in exchange 'amq.topic' in vhost '/' refused for user '{user}'"
    deadline = time.monotonic() + bound(timeout)
    while line not in (member.workdir / "log" / f"{member.name}.log").read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.rabbitmq
def test_two_node_cluster_routes_across_nodes_and_enforces_permissions(cluster: RabbitCluster) -> None:
    assert cluster.running_nodes() == sorted(n.name for n in cluster.members)

    async def run() -> None:
        async with _client(cluster, 0, "aggregator", "agg-x") as agg:
            await agg.subscribe("fedline/test/sites/+/update/#", qos=1)
            async with _client(cluster, 1, "site-a", "site-a-x") as site:
                await site.publish("fedline/test/sites/site-a/update/m1/0", b"sealed", qos=1)
            async with asyncio.timeout(10):
                async for m in agg.messages:
                    assert str(m.topic) == "fedline/test/sites/site-a/update/m1/0" and m.payload == b"sealed"
                    break
            # site-a may not publish as site-b: RabbitMQ closes its connection, nothing reaches the aggregator
            with pytest.raises(aiomqtt.MqttError):
                async with _client(cluster, 1, "site-a", "site-a-y", REFUSED_TIMEOUT_S) as site:
                    await site.publish("fedline/test/sites/site-b/update/m2/0", b"forged", qos=1)
                    await asyncio.sleep(1.0)
                    await site.publish("fedline/test/sites/site-a/update/m3/0", b"after", qos=1)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for m in agg.messages:
                        raise AssertionError(f"forged or post-violation message delivered: {m.topic}")
        # a site may not read another site's receipts
        with pytest.raises(aiomqtt.MqttError):
            async with _client(cluster, 0, "site-a", "site-a-z", REFUSED_TIMEOUT_S) as site:
                await site.subscribe("fedline/test/sites/site-b/receipts", qos=1)
                await asyncio.sleep(1.0)
                await site.publish("fedline/test/sites/site-a/status", b"alive", qos=1)

    asyncio.run(run())
    # both failures were RabbitMQ's topic permissions refusing, not a slow broker
    assert _refused(cluster, 1, "fedline.test.sites.site-b.update.m2.0", "site-a")
    assert _refused(cluster, 0, "fedline.test.sites.site-b.receipts", "site-a")


@pytest.mark.rabbitmq
def test_retained_messages_stay_on_the_node_that_took_them(cluster: RabbitCluster) -> None:
    """Why fedline cannot rely on retained messages on a RabbitMQ cluster (the aggregator answers requests)."""

    async def run() -> dict[int, bytes | None]:
        async with _client(cluster, 0, "aggregator", "agg-r") as agg:
            await agg.publish("fedline/test/model/manifest", b"v7", qos=1, retain=True)
        seen: dict[int, bytes | None] = {}
        for node in (0, 1):
            async with _client(cluster, node, "site-b", f"site-b-r{node}") as site:
                await site.subscribe("fedline/test/model/manifest", qos=1)
                try:
                    async with asyncio.timeout(2.0):
                        async for m in site.messages:
                            seen[node] = bytes(m.payload)
                            break
                except TimeoutError:
                    seen[node] = None
        return seen

    assert asyncio.run(run()) == {0: b"v7", 1: None}
