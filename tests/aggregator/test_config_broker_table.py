"""The aggregator's and ``fedline status``'s [broker] tables go through the one parser of broker tables
(BrokerSettings.from_table): paths relative to their file, and the same refusals as the edge's."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import load_config
from aggregator.status import load_status_config
from fedline.config import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "aggregator" / "aggregator.example.toml"


def _with_broker(tmp_path: Path, broker: str) -> Path:
    """The shipped example, its [broker] table replaced."""
    text = EXAMPLE.read_text()
    head, _, tail = text.partition("[broker]")
    rest = tail.split("\n[", 1)
    path = tmp_path / "conf" / "aggregator.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "[broker]\n" + broker + ("\n[" + rest[1] if len(rest) > 1 else "\n"))
    return path


def test_broker_paths_are_relative_to_the_file_for_the_aggregator_and_status(tmp_path: Path) -> None:
    path = _with_broker(
        tmp_path,
        'url = "mqtts://broker.plant:8883"\nusername = "aggregator"\n'
        'password_file = "secrets/aggregator.password"\nca_file = "pki/ca.crt"\n',
    )
    for broker in (load_config(path).broker, load_status_config(path).broker):
        assert broker.password_file == str(path.parent / "secrets" / "aggregator.password")
        assert broker.ca_file == str(path.parent / "pki" / "ca.crt")
        assert broker.url == "mqtts://broker.plant:8883"


@pytest.mark.parametrize("loader", [load_config, load_status_config])
def test_a_ca_on_a_plaintext_url_is_refused_naming_the_key(tmp_path: Path, loader) -> None:
    path = _with_broker(tmp_path, 'url = "mqtt://broker.plant:1883"\nca_file = "pki/ca.crt"\n')
    with pytest.raises(ConfigError) as info:  # a CA with a plain-text URL would be a silent downgrade
        loader(path)
    assert info.value.key == "broker.ca_file" and info.value.file == str(path)


@pytest.mark.parametrize("loader", [load_config, load_status_config])
def test_an_unknown_broker_key_is_named(tmp_path: Path, loader) -> None:
    path = _with_broker(tmp_path, 'url = "mqtt://127.0.0.1:1883"\npasword_file = "x"\n')
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert "pasword_file" in str(info.value) and info.value.file == str(path)
