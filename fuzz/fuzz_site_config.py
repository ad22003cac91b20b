"""Fuzz the site configuration: ``site.toml`` bytes through ``load_edge_config``.

A mistyped or hostile site file must give ``ConfigError`` naming the file and
key (the same path an operator's typo takes: ``load_toml`` → ``parse`` of every
section → ``[[sources]]`` tables through ``firmware_adapters.build_source``,
which validates and connects to nothing).
"""

from __future__ import annotations

import os

from _harness import instrumented, main, scratch_dir

with instrumented():
    from edge.config import load_edge_config
    from firmware_adapters import build_sources

_DIR = scratch_dir("site")
_FILE = _DIR / "site.toml"
(_DIR / "data.csv").write_text("t,a,b,c,label\n0,1,2,3,0\n")

VALID = b"""site = "press-3"
federation = "plant-a"
data_dir = "state"
model_dir = "models"

[keys]
private = "keys/press-3.key"
enrollment = "keys/enrollment.json"

[broker]
url = "mqtt://127.0.0.1:1883"

[[sources]]
kind = "csv"
path = "data.csv"
rate_hz = 0.0

[[sources]]
kind = "modbus_tcp"
host = "127.0.0.1"
port = 5020
poll_interval_s = 0.5
tags = [{ name = "a", address = 0, type = "uint16" }]

[rows]
label = "label"
features = [{ tag = "a", range = [0.0, 10.0] }, { tag = "b", range = [0.0, 10.0] },
            { tag = "c", range = [0.0, 10.0] }]

[model]
kind = "mlp"
n_features = 3
hidden = [8]
personal = ["head."]

[training]
every_rows = 500
epochs = 2

[privacy]
epsilon = 8.0
delta = 1e-5
"""


def target(data: bytes) -> None:
    _FILE.write_bytes(data)
    cfg = load_edge_config(_FILE)
    build_sources(cfg.sources, file=_FILE)
    assert cfg.site and cfg.federation


def seeds() -> list[bytes]:
    return [
        VALID,
        VALID.replace(b"[privacy]\nepsilon = 8.0\ndelta = 1e-5\n", b'privacy = "off"\n'),
        VALID.replace(b'kind = "mlp"', b'kind = "gru"\nwindow = 4'),
        b'[[sources]]\nkind = "opcua"\nurl = "opc.tcp://h:4840"\nnodes = [{tag = "t", node_id = "ns=2;i=1"}]\n',
        b'[[sources]]\nkind = "serial"\nport = "/dev/null"\nprotocol = "csv"\nheader = true\n',
        b'[[sources]]\nkind = "sparkplug"\ngroup_id = "g"\n',
    ]


if __name__ == "__main__":
    os.chdir(_DIR)
    main(target, seeds())
