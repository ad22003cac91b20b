"""Configuration errors name the file and the key, at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedline.config import ConfigError, load_toml
from firmware_adapters import build_source, build_sources
from firmware_adapters.registers import load_register_map

REPO = Path(__file__).resolve().parents[2]


def site(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def error_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build_sources(load_toml(path)["sources"], file=path)
    return info.value


def test_missing_address_names_file_and_key(tmp_path: Path) -> None:
    p = site(
        tmp_path,
        """
[[sources]]
kind = "csv"
path = "x.csv"
[[sources]]
kind = "modbus_tcp"
host = "127.0.0.1"
[[sources.tags]]
name = "t"
table = "holding"
""",
    )
    (tmp_path / "x.csv").write_text("a\n1\n")
    err = error_of(p)
    assert err.file == str(p) and err.key == "sources[1].tags[0].address"
    assert "missing" in str(err) and "integer" in str(err)


def test_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    err = error_of(site(tmp_path, '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\npoll_intervall_s = 1\n'))
    assert err.key == "sources[0].poll_intervall_s" and "unknown key" in err.message
    assert "poll_interval_s" in err.message  # the list of expected keys helps spot the typo
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\nport = "502"\n[[sources.tags]]\nname="a"\ntable="holding"\naddress=0\n',
        )
    )
    assert err.key == "sources[0].port" and "integer" in err.message
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\n[[sources.tags]]\nname="a"\ntable="holdings"\naddress=0\n',
        )
    )
    assert err.key == "sources[0].tags[0].table" and "'holding'" in err.message


def test_unknown_kind_and_missing_kind(tmp_path: Path) -> None:
    err = error_of(site(tmp_path, '[[sources]]\nkind = "profinet"\n'))
    assert err.key == "sources[0].kind" and "modbus_tcp" in err.message
    err = error_of(site(tmp_path, '[[sources]]\nname = "x"\n'))
    assert err.key == "sources[0].kind"


def test_cross_field_checks(tmp_path: Path) -> None:
    err = error_of(site(tmp_path, '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\n'))
    assert err.key == "sources[0]" and "map" in err.message
    err = error_of(site(tmp_path, '[[sources]]\nkind = "serial"\nport = "loop://"\nprotocol = "csv"\n'))
    assert "columns" in err.message
    err = error_of(site(tmp_path, '[[sources]]\nkind = "opcua"\nurl = "opc.tcp://h:4840"\nnodes = [{tag = "t"}]\n'))
    assert err.key == "sources[0].nodes[0]" and "node_id" in err.message
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\n'
            '[[sources.tags]]\nname="a"\ntable="coil"\naddress=0\ntype="float32"\n',
        )
    )
    assert err.key == "sources[0].tags[0]" and "bool" in err.message


def test_register_map_file_errors_name_the_map_file(tmp_path: Path) -> None:
    m = tmp_path / "maps" / "press.toml"
    m.parent.mkdir()
    m.write_text(
        '[[tags]]\nname = "a"\ntable = "holding"\naddress = 0\ntype = "float32"\n'
        '[[tags]]\nname = "b"\ntable = "holding"\naddress = 1\n'
    )
    p = site(tmp_path, '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\nmap = "maps/press.toml"\n')
    err = error_of(p)
    assert err.file == str(m) and "overlap" in err.message
    m.write_text('[[tags]]\nname = "a"\ntable = "holding"\naddress = 70000\n')
    err = error_of(p)
    assert err.file == str(m) and err.key == "tags[0]" and "65535" in err.message


def test_csv_source_checks_its_file_and_columns(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    err = error_of(site(tmp_path, '[[sources]]\nkind = "csv"\npath = "missing.csv"\n'))
    assert err.key == "sources[0].path" and "missing.csv" in err.message
    err = error_of(site(tmp_path, '[[sources]]\nkind = "csv"\npath = "d.csv"\ncolumns = ["a", "c"]\n'))
    assert err.key == "sources[0].columns" and "'c'" in err.message


def test_bundled_ai4i_map_is_valid() -> None:
    regmap = load_register_map(REPO / "firmware_adapters" / "maps" / "ai4i2020.toml")
    assert regmap.row_counter == "row"
    assert set(regmap.ranges()) == {
        "Air temperature [K]",
        "Process temperature [K]",
        "Rotational speed [rpm]",
        "Torque [Nm]",
        "Tool wear [min]",
    }
    types = {t.name: t.type for t in regmap.tags}
    assert types["Torque [Nm]"] == "float32" and types["Machine failure"] == "bool"
    source = build_source(
        {"kind": "modbus_tcp", "host": "127.0.0.1", "map": str(REPO / "firmware_adapters/maps/ai4i2020.toml")}
    )
    assert source.requests_per_poll() == {"default": 2}


def test_fedline_sources_command(tmp_path: Path, capsys) -> None:
    from fedline.cli import main

    (tmp_path / "d.csv").write_text("t,temp\n1,20.5\n2,21\n3,22\n")
    good = site(tmp_path, '[[sources]]\nkind = "csv"\nname = "bench"\npath = "d.csv"\nts_column = "t"\n')
    assert main(["sources", "--config", str(good), "--count", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bench: csv ok"
    assert out[1] == '1.000 bench good {"temp": 20.5}' and out[2] == '2.000 bench good {"temp": 21}'
    assert "'reads': 2" in out[3]
    bad = site(tmp_path, '[[sources]]\nkind = "csv"\nname = "bench"\npath = "d.csv"\nrate = 5\n')
    assert main(["sources", "--config", str(bad), "--check"]) == 78
    assert "sources[0].rate: unknown key" in capsys.readouterr().err


def test_numbers_are_checked_against_their_own_key(tmp_path: Path) -> None:
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\npoll_interval_s = nan\n'
            '[[sources.tags]]\nname="a"\ntable="holding"\naddress=0\n',
        )
    )
    assert err.key == "sources[0].poll_interval_s" and "> 0" in err.message
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\ngroup_intervals_s = {fast = -1}\n'
            '[[sources.tags]]\nname="a"\ntable="holding"\naddress=0\n',
        )
    )
    assert err.key == "sources[0].group_intervals_s.fast"
    err = error_of(site(tmp_path, '[[sources]]\nkind = "sparkplug"\nurl = "http://broker"\n'))
    assert err.key == "sources[0].url"
    err = error_of(
        site(
            tmp_path,
            '[[sources]]\nkind = "opcua"\nurl = "http://h"\nsecurity_mode = "None"\nnodes = [{tag = "t", node_id = "i=1"}]\n',
        )
    )
    assert err.key == "sources[0].url"
    (tmp_path / "adir").mkdir()
    err = error_of(site(tmp_path, '[[sources]]\nkind = "modbus_tcp"\nhost = "h"\nmap = "adir"\n'))
    assert "adir" in str(err)  # the map path is named (as the file, or in the message for sources[0].map)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81a,b\n")
    err = error_of(site(tmp_path, '[[sources]]\nkind = "csv"\npath = "bin.csv"\n'))
    assert err.key == "sources[0].path"


_KEYS = [
    "kind",
    "name",
    "host",
    "port",
    "map",
    "tags",
    "poll_interval_s",
    "group_intervals_s",
    "device_id",
    "protocol",
    "columns",
    "header",
    "url",
    "nodes",
    "topics",
    "path",
    "rate_hz",
    "filter",
    "security_mode",
    "word_order",
    "row_counter",
    "timeout_s",
    "baudrate",
    "parity",
    "stopbits",
    "ts_column",
]
_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=8),
    st.booleans(),
    st.sampled_from(
        [
            "modbus_tcp",
            "modbus_rtu",
            "serial",
            "opcua",
            "mqtt_json",
            "sparkplug",
            "csv",
            "d.csv",
            "holding",
            "coil",
            "opc.tcp://h:1",
            "mqtt://h:1",
            "big",
            "E",
            "kv",
        ]
    ),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from([*_KEYS, "address", "type", "tag", "node_id"]), inner, max_size=4),
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_KEYS), _values, max_size=7))
def test_any_table_builds_a_source_or_raises_config_error(tmp_path: Path, table: dict) -> None:
    (tmp_path / "d.csv").write_text("t,a\n1,2\n")
    try:
        build_source(table, file=tmp_path / "site.toml", where="sources[0]")
    except ConfigError as exc:
        assert exc.key.startswith("sources[0]") or exc.file != str(tmp_path / "site.toml")
