"""One ``[metrics]`` table with one meaning of ``port`` in every service's config, and the
process_* series in every registry (served for real over HTTP)."""

from __future__ import annotations

import urllib.request

import pytest

from aggregator.config import AggregatorConfig
from edge.config import EdgeConfig
from edge.inference.config import InferConfig
from fedline.config import ConfigError, parse
from fedline.metrics import MetricsConfig, MetricsServer, new_registry


def test_every_service_uses_the_one_metrics_table() -> None:
    for cfg in (AggregatorConfig, EdgeConfig, InferConfig):
        field = cfg.__dataclass_fields__["metrics"]
        assert field.type in (MetricsConfig, "MetricsConfig"), cfg
    assert MetricsConfig().port is None  # off unless asked: no default port to collide with


def test_no_port_is_off_zero_is_any_free_port() -> None:
    off = MetricsServer(new_registry())
    assert off.start(parse(MetricsConfig, {}), service="t") is None
    on = MetricsServer(new_registry())
    port = on.start(parse(MetricsConfig, {"port": 0}), service="t")
    try:
        assert port and port > 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "process_resident_memory_bytes" in body and "process_start_time_seconds" in body
        assert "python_info" in body
        # a port already taken is a configuration error naming the key, not a traceback
        with pytest.raises(ConfigError, match=r"site.toml: metrics.port: cannot serve /metrics"):
            MetricsServer(new_registry()).start(MetricsConfig(port=port), service="t", file="site.toml")
    finally:
        on.stop()


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="port must be 0..65535"):
        parse(MetricsConfig, {"port": 70000}, file="line.toml", where="metrics")
    with pytest.raises(ConfigError, match="unknown key"):
        parse(MetricsConfig, {"bind": "0.0.0.0"}, file="aggregator.toml", where="metrics")
