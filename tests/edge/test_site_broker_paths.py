"""The site's [broker] table: file paths are relative to site.toml (as the docs say), parsed by the one parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.agent import EdgeAgent
from edge.config import load_edge_config
from fedline.config import ConfigError
from tests.edge.helpers import Federation, write_csv, write_site


def test_broker_paths_are_relative_to_site_toml(tmp_path: Path) -> None:
    fed = Federation.create(tmp_path, ["site-a"])
    csv = write_csv(tmp_path / "rows.csv", 10)
    path = write_site(
        fed,
        "site-a",
        csv,
        "mqtts://broker.plant:8883",
        None,
        broker={"password_file": "secrets/site-a.password", "ca_file": "pki/ca.crt"},
    )
    agent = EdgeAgent(load_edge_config(path))
    try:
        s = agent.settings
        assert s.password_file == str(path.parent / "secrets" / "site-a.password")
        assert s.ca_file == str(path.parent / "pki" / "ca.crt")
        assert s.client_id == "site-a"
    finally:
        agent.close()
    bad = write_site(fed, "site-a", csv, "mqtt://broker.plant:1883", None, broker={"ca_file": "pki/ca.crt"})
    with pytest.raises(ConfigError) as info:  # a CA with a plain-text URL would be a silent downgrade
        EdgeAgent(load_edge_config(bad))
    assert info.value.key == "broker.ca_file" and info.value.file == str(bad)
