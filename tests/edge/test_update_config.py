"""``[update] quantise`` in site.toml: off by default, int8 on request, refused with secure aggregation."""

from __future__ import annotations

import pytest

from edge.config import load_edge_config
from fedline.config import ConfigError
from tests.edge.helpers import Federation, write_csv, write_site


def _site(tmp_path, update: str | None, **extra) -> str:
    fed = Federation.create(tmp_path, ["site-a"])
    path = write_site(fed, "site-a", write_csv(tmp_path / "a.csv", 10), "mqtt://127.0.0.1:1", None, extra=extra or None)
    if update is not None:
        path.write_text(path.read_text() + f"[update]\n{update}\n")
    return str(path)


def test_quantisation_is_off_unless_asked(tmp_path) -> None:
    assert load_edge_config(_site(tmp_path, None)).update.encoding == "float32"
    assert load_edge_config(_site(tmp_path / "b", 'quantise = "int8"')).update.encoding == "int8"


def test_an_unknown_quantisation_names_the_key_and_the_choices(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_edge_config(_site(tmp_path, 'quantise = "int4"'))
    assert err.value.key == "update.quantise" and "'off', 'int8'" in err.value.message
    with pytest.raises(ConfigError) as err:
        load_edge_config(_site(tmp_path / "b", "bits = 8"))
    assert err.value.key == "update.bits"


def test_int8_with_secure_aggregation_is_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_edge_config(_site(tmp_path, 'quantise = "int8"', secure_aggregation=True))
    assert err.value.key == "update.quantise"
    assert "secure_aggregation" in err.value.message and "own 32-bit field" in err.value.message
    # off is fine with secure aggregation
    assert load_edge_config(_site(tmp_path / "b", 'quantise = "off"', secure_aggregation=True)).secure_aggregation
