"""The documented example site.toml is what the agent really loads."""

from pathlib import Path

from edge.config import load_edge_config

EXAMPLE = Path(__file__).resolve().parents[2] / "edge" / "site.example.toml"


def test_example_site_file_loads_with_its_sources() -> None:
    cfg = load_edge_config(EXAMPLE)
    assert cfg.site == "plant-a" and cfg.model.n_features == len(cfg.rows["features"]) == 5
    assert cfg.privacy != "off" and cfg.privacy.epsilon == 8.0
    assert cfg.sources[0]["kind"] == "modbus_tcp"
    from firmware_adapters import build_source

    source = build_source(cfg.sources[0], file=EXAMPLE)
    assert source is not None
