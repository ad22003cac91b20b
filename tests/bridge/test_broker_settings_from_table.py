"""``BrokerSettings.from_table``: the one parser of broker tables (paths relative to the file, keys named)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_bridge.client import BrokerSettings
from fedline.config import ConfigError


def test_paths_are_relative_to_the_config_file_and_defaults_apply(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "line.toml"
    s = BrokerSettings.from_table(
        {
            "url": "mqtts://b:8883",
            "password_file": "secrets/p",
            "ca_file": "/abs/ca.crt",
            "cert_file": "c.crt",
            "key_file": "c.key",
            "protocol": "3.1.1",
        },
        conf,
        "output.broker",
        client_id="line-a",
    )
    assert s.password_file == str(tmp_path / "etc" / "secrets" / "p")
    assert s.ca_file == "/abs/ca.crt"  # absolute stays
    assert (s.cert_file, s.key_file) == (str(tmp_path / "etc" / "c.crt"), str(tmp_path / "etc" / "c.key"))
    assert (s.client_id, s.protocol, s.tls, s.port) == ("line-a", "3.1.1", True, 8883)
    assert BrokerSettings.from_table({"client_id": "mine"}, None, client_id="default").client_id == "mine"


@pytest.mark.parametrize(
    "table, key, words",
    [
        ({"url": "http://b"}, "broker.url", "mqtt://"),
        ({"protocol": "4"}, "broker.protocol", "5"),
        ({"bogus": 1}, "broker.bogus", "unknown key"),
        ({"url": "mqtt://b", "ca_file": "ca.crt"}, "broker.ca_file", "not TLS"),
        ({"url": "mqtts://b", "key_file": "k"}, "broker.cert_file", "both"),
        ({"max_chunk": 10}, "broker.max_chunk", "too small"),
    ],
)
def test_errors_name_the_file_and_the_key(table: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        BrokerSettings.from_table(table, "site.toml")
    assert (info.value.file, info.value.key) == ("site.toml", key)
    assert words in info.value.message
