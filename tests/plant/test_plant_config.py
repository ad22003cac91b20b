"""``plant.toml``: the shipped example loads, and mistakes are named by file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from fedline.config import ConfigError, load_toml
from plant.config import load_plant_config, parse_plant_config

EXAMPLE = Path(__file__).resolve().parents[2] / "plant" / "plant.example.toml"


def test_the_shipped_example_loads_with_paths_relative_to_it():
    cfg = load_plant_config(EXAMPLE)
    assert cfg.plant.aggregator.federation == "plant-a"
    assert cfg.upstream.site == "plant-a" and cfg.upstream.federation == "central"
    assert cfg.upstream.key_file == str(EXAMPLE.parent / "keys" / "central" / "plant-a.key")
    assert cfg.upstream.data_dir == str(EXAMPLE.parent / "upstream")
    assert cfg.upstream.broker.tls and cfg.upstream.broker.ca_file == str(EXAMPLE.parent / "keys/central/ca.pem")
    assert cfg.plant.strategy.buffer_size == 3


@pytest.mark.parametrize(
    ("change", "key", "needle"),
    [
        (lambda d: d.pop("upstream"), "upstream", "missing"),
        (lambda d: d["upstream"].pop("broker"), "upstream.broker", "missing"),
        (lambda d: d["upstream"].update(site="plant/a"), "upstream", "'/'"),
        (lambda d: d["upstream"].update(colour="red"), "upstream.colour", "unknown key"),
        (lambda d: d["upstream"]["broker"].update(url="http://x"), "upstream.broker.url", "mqtt"),
        (lambda d: d["upstream"]["outbox"].update(resend_after_s=0), "upstream.outbox", "resend_after_s"),
        (lambda d: d["strategy"].update(secure_aggregation=True, min_sites=2), "strategy", "min_sites >= 3"),
        (
            lambda d: d["upstream"].update(secure_aggregation=True, update={"quantise": "int8"}),
            "upstream.update.quantise",
            "cannot be combined with upstream.secure_aggregation",
        ),
    ],
)
def test_a_bad_plant_toml_names_the_key(tmp_path, change, key, needle):
    doc = load_toml(EXAMPLE)
    change(doc)
    path = tmp_path / "plant.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_plant_config(path)
    assert err.value.key == key and needle in err.value.message, (err.value.key, err.value.message)


def test_secure_aggregation_within_a_plant_loads_with_the_aggregators_rules():
    """The plant runs cohorts over its lines like any aggregator (its config rules are the aggregator's)."""
    doc = load_toml(EXAMPLE)
    doc["strategy"]["secure_aggregation"] = True
    doc["strategy"].pop("buffer_timeout_s", None)
    cfg = parse_plant_config(doc, EXAMPLE)
    assert cfg.plant.strategy.secure_aggregation and cfg.plant.strategy.min_sites == 3


def test_the_central_federation_cannot_be_the_plants_own_on_the_same_broker():
    doc = load_toml(EXAMPLE)
    doc["upstream"]["federation"] = doc["aggregator"]["federation"]
    doc["upstream"]["broker"]["url"] = doc["broker"]["url"]
    with pytest.raises(ConfigError, match="same"):
        parse_plant_config(doc, EXAMPLE)


def test_fedline_plant_exits_78_naming_the_key(tmp_path, capsys):
    from fedline.cli import EX_CONFIG, main

    doc = load_toml(EXAMPLE)
    doc["upstream"]["outbox"]["max_count"] = 0
    path = tmp_path / "plant.toml"
    path.write_text(tomli_w.dumps(doc))
    assert main(["plant", "--config", str(path)]) == EX_CONFIG
    assert "upstream.outbox" in capsys.readouterr().err


def test_fedline_plant_exits_78_on_a_missing_site_key(tmp_path, capsys):
    from fedline.cli import EX_CONFIG, main

    doc = load_toml(EXAMPLE)
    for table, key in (("aggregator", "state_dir"), ("upstream", "data_dir")):
        doc[table][key] = str(tmp_path / key)
    path = tmp_path / "plant.toml"
    path.write_text(tomli_w.dumps(doc))
    assert main(["plant", "--config", str(path)]) == EX_CONFIG  # keys/central/plant-a.key is not there
    assert "plant-a.key" in capsys.readouterr().err
