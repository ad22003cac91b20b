"""CSV replay, and the simulated PLC (`fedline plc-sim`) polled by the Modbus source."""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmware_adapters import build_source
from firmware_adapters.plc_sim import PlcSimulator
from firmware_adapters.registers import load_register_map
from firmware_adapters.rows import RowBuilder, parse_row_mapping

from .conftest import take

REPO = Path(__file__).resolve().parents[2]
AI4I = REPO / "data" / "ai4i2020.csv"
AI4I_MAP = REPO / "firmware_adapters" / "maps" / "ai4i2020.toml"
FEATURES = [
    "Air temperature [K]",
    "Process temperature [K]",
    "Rotational speed [rpm]",
    "Torque [Nm]",
    "Tool wear [min]",
]


def ai4i_rows(type_: str | None = None) -> list[dict[str, str]]:
    with AI4I.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if type_ is None or r["Type"] == type_]


async def test_csv_replay_plays_filtered_numeric_columns_then_ends() -> None:
    source = build_source({"kind": "csv", "name": "ai4i", "path": str(AI4I), "filter": {"Type": "H"}})
    expected = ai4i_rows("H")
    samples = [s async for s in source]
    assert len(samples) == len(expected) == source.stats.reads
    assert "Type" not in source.columns and "Product ID" not in source.columns and "Torque [Nm]" in source.columns
    assert samples[0].values["UDI"] == int(expected[0]["UDI"])
    assert samples[-1].values["Torque [Nm]"] == float(expected[-1]["Torque [Nm]"])


async def test_csv_replay_rate_loop_and_bad_cells(tmp_path: Path) -> None:
    f = tmp_path / "line.csv"
    f.write_text("t,temp,state\n1,20.5,0\n2,oops,1\n3,21.0,0\n")
    source = build_source(
        {
            "kind": "csv",
            "path": "line.csv",
            "rate_hz": 50.0,
            "loop": True,
            "columns": ["temp", "state"],
            "ts_column": "t",
        },
        file=tmp_path / "site.toml",
    )
    t0 = time.monotonic()
    samples = await take(source, 7)
    assert time.monotonic() - t0 >= 6 / 50 * 0.8  # paced, not as fast as possible
    assert [s.ts for s in samples] == [1, 2, 3, 1, 2, 3, 1]
    assert [s.good for s in samples] == [True, False, True, True, False, True, True]
    assert source.stats.bad_reads == 2 and samples[2].values == {"temp": 21.0, "state": 0}


async def test_csv_to_training_rows_end_to_end() -> None:
    regmap = load_register_map(AI4I_MAP)
    mapping = parse_row_mapping({"features": [{"tag": t} for t in FEATURES], "label": "Machine failure"})
    builder = RowBuilder(mapping, ranges=regmap.ranges())
    source = build_source({"kind": "csv", "path": str(AI4I)})
    rows = [r for r in [builder.push(s) async for s in source] if r is not None]
    assert len(rows) == 10000
    x = np.stack([r.x for r in rows])
    y = np.array([r.y for r in rows])
    assert x.shape == (10000, 5) and x.min() >= 0 and x.max() <= 1 and builder.stats.out_of_range == 0
    assert set(np.unique(y)) == {0.0, 1.0} and y.sum() == sum(int(r["Machine failure"]) for r in ai4i_rows())


async def test_plc_sim_serves_rows_that_the_modbus_source_reads_back(port: int) -> None:
    expected = ai4i_rows("M")
    regmap = load_register_map(AI4I_MAP)
    sim = PlcSimulator(AI4I, regmap, port=port, filters={"Type": "M"}, loop=False)
    source = build_source(
        {"kind": "modbus_tcp", "host": "127.0.0.1", "port": port, "map": str(AI4I_MAP), "poll_interval_s": 0.02}
    )
    agen = source.__aiter__()
    async with sim:
        try:
            first = await asyncio.wait_for(agen.__anext__(), 5)
            assert first.values["row"] == 1
            for name in FEATURES:
                assert first.values[name] == pytest.approx(float(expected[0][name]), rel=1e-6), name
            assert first.values["Machine failure"] is bool(int(expected[0]["Machine failure"]))
            waiting = asyncio.create_task(agen.__anext__())
            await asyncio.sleep(0.1)  # polls that see the same row are repeats, not samples
            assert source.stats.repeats >= 2 and not waiting.done()
            await sim.tick()
            assert (await asyncio.wait_for(waiting, 5)).values["row"] == 2
            for _ in range(3):  # nobody polls meanwhile: two rows are missed
                await sim.tick()
            nxt = await asyncio.wait_for(agen.__anext__(), 5)
            assert nxt.values["row"] == 5 and source.stats.skipped == 2
            assert nxt.values["Torque [Nm]"] == pytest.approx(float(expected[4]["Torque [Nm]"]), rel=1e-6)
            assert source.stats.reads == 3
        finally:
            await agen.aclose()


async def test_plc_sim_command_line(port: int) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedline.cli",
            "plc-sim",
            "--csv",
            str(AI4I),
            "--map",
            str(AI4I_MAP),
            "--port",
            str(port),
            "--rate",
            "50",
            "--filter",
            "Type=L",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        source = build_source(
            {
                "kind": "modbus_tcp",
                "host": "127.0.0.1",
                "port": port,
                "map": str(AI4I_MAP),
                "poll_interval_s": 0.01,
                "reconnect_initial_s": 0.05,
                "reconnect_max_s": 0.2,
            }
        )
        samples = await take(source, 5, timeout=20, pred=lambda s: s.good)
        served = {r["UDI"]: r for r in ai4i_rows("L")}
        low_torques = {float(r["Torque [Nm]"]) for r in served.values()}
        assert all(round(s.values["Torque [Nm]"], 1) in low_torques for s in samples)
        counters = [s.values["row"] for s in samples]
        assert counters == sorted(counters) and len(set(counters)) == 5
        # the polled samples make training rows with the map's engineering ranges
        mapping = parse_row_mapping({"features": [{"tag": t} for t in FEATURES], "label": "Machine failure"})
        rows = [RowBuilder(mapping, ranges=source.ranges).push(s) for s in samples]
        assert all(
            r is not None and r.x.shape == (5,) and 0 <= r.x.min() and r.x.max() <= 1 and r.y in (0.0, 1.0)
            for r in rows
        )
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert "serving" in out, err


def test_plc_sim_refuses_a_map_column_the_csv_lacks(tmp_path: Path) -> None:
    from fedline.config import ConfigError

    (tmp_path / "d.csv").write_text("a\n1\n")
    with pytest.raises(ConfigError) as info:
        PlcSimulator(tmp_path / "d.csv", load_register_map(AI4I_MAP), map_file=AI4I_MAP)
    assert info.value.key == "tags[1].column" and "Air temperature [K]" in info.value.message
