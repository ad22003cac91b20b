"""A simulated PLC: serve a CSV file as a live Modbus TCP server, one row per tick.

Used by ``fedline plc-sim``, the demo, docker-compose and the tests, so that
every Modbus path is exercised against a real pymodbus server. The register map
is the same TOML format the Modbus source reads (:mod:`firmware_adapters.registers`);
each tag is fed from the CSV column named by its ``column`` (default: its name),
and the map's ``row_counter`` tag, if any, counts the rows served (1 for the
first row), so a poller can tell new rows from repeats and count skipped ones.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedline.config import ConfigError
from fedline.logs import event
from firmware_adapters.csv_replay import parse_number, read_rows
from firmware_adapters.registers import BIT_TABLES, RegisterMap, TagSpec, encode

log = logging.getLogger("fedline.adapters.plc_sim")

# function codes the pymodbus datastore maps to each table when setting values
_FC = {"coil": 15, "discrete": 2, "holding": 16, "input": 4}
_BLOCK_INDEX = {"coil": 0, "discrete": 1, "holding": 2, "input": 3}


class RegisterServer:
    """A real pymodbus TCP server whose memory is laid out by a register map.

    ``write(tag, value)`` encodes an engineering value exactly as a PLC would
    hold it (type, word and byte order, scale); the simulator and the tests
    use it. Device id 0 answers every unit id, like a gateway with one PLC.
    """

    def __init__(
        self,
        regmap: RegisterMap,
        host: str = "127.0.0.1",
        port: int = 5020,
        *,
        serial_port: str | None = None,
        baudrate: int = 19200,
    ) -> None:
        self.regmap = regmap
        self.host, self.port = host, port
        self.serial_port, self.baudrate = serial_port, baudrate  # serial_port: serve Modbus RTU there
        self._server: Any = None

    def _device(self) -> Any:
        from pymodbus.simulator import DataType, SimData, SimDevice

        blocks: list[list[Any]] = [[], [], [], []]
        for table, idx in _BLOCK_INDEX.items():
            tags = [t for t in self.regmap.tags if t.table == table]
            end = max((t.address + t.words for t in tags), default=1)
            if table in BIT_TABLES:
                blocks[idx].append(SimData(address=0, count=end, values=False, datatype=DataType.BITS))
            else:
                blocks[idx].append(SimData(address=0, count=end, values=0, datatype=DataType.REGISTERS))
        return SimDevice(id=0, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]))

    async def start(self) -> None:
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer

        if self.serial_port is not None:
            self._server = ModbusSerialServer(self._device(), port=self.serial_port, baudrate=self.baudrate)
        else:
            self._server = ModbusTcpServer(self._device(), address=(self.host, self.port))
        await self._server.serve_forever(background=True)

    async def write(self, tag: TagSpec, value: float | int | bool | str) -> None:
        await self._server.async_setValues(0, _FC[tag.table], tag.address, encode(self.regmap, tag, value))

    async def write_raw(self, table: str, address: int, words: list[int] | list[bool]) -> None:
        await self._server.async_setValues(0, _FC[table], address, words)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> RegisterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class PlcSimulator:
    """``await sim.start()``, then ``await sim.tick()`` per row (or ``await sim.run()``)."""

    def __init__(
        self,
        csv_path: str | Path,
        regmap: RegisterMap,
        *,
        host: str = "127.0.0.1",
        port: int = 5020,
        rate_hz: float = 1.0,
        filters: dict[str, str] | None = None,
        loop: bool = True,
        map_file: str | Path | None = None,
    ) -> None:
        self.csv_path = Path(csv_path)
        self.regmap = regmap
        self.host, self.port = host, port
        self.rate_hz = rate_hz
        self.filters = dict(filters or {})
        self.loop = loop
        self.rows_served = 0
        self.bad_cells = 0
        self._server: RegisterServer | None = None
        self._rows: Iterator[dict[str, str]] | None = None
        header, rows = read_rows(self.csv_path, {})
        rows.close()  # type: ignore[attr-defined]
        for col in self.filters:
            if col not in header:
                raise ConfigError(None, "--filter", f"column {col!r} is not in {self.csv_path.name}")
        self._columns: dict[str, TagSpec] = {}
        for i, tag in enumerate(regmap.tags):
            if tag.name == regmap.row_counter:
                continue
            col = tag.column or tag.name
            if col not in header:
                raise ConfigError(
                    map_file,
                    f"tags[{i}].column",
                    f"tag {tag.name!r} reads CSV column {col!r}, which {self.csv_path.name} does not have",
                )
            self._columns[col] = tag

    async def start(self) -> None:
        """Listen on host:port and serve the first row."""
        self._server = RegisterServer(self.regmap, self.host, self.port)
        await self._server.start()
        self._rows = self._row_iter()
        await self.tick()
        event(log, "plc_sim.listening", host=self.host, port=self.port, csv=str(self.csv_path))

    def _row_iter(self) -> Iterator[dict[str, str]]:
        while True:
            _, rows = read_rows(self.csv_path, self.filters)
            n = 0
            for row in rows:
                n += 1
                yield row
            if not self.loop or n == 0:
                return

    async def write(self, tag: TagSpec, value: float | int | bool | str) -> None:
        """Set one tag's registers."""
        assert self._server is not None, "start() first"
        await self._server.write(tag, value)

    async def tick(self) -> bool:
        """Serve the next row; False when the file is exhausted (and not looping)."""
        assert self._rows is not None, "start() first"
        row = next(self._rows, None)
        if row is None:
            return False
        for col, tag in self._columns.items():
            value: float | int | str | None
            if tag.type == "string":
                value = row.get(col)  # served as text (e.g. the AI4I "Type" column)
            else:
                try:
                    value = parse_number(row.get(col) or "")
                except ValueError:
                    value = None
            if value is None:
                self.bad_cells += 1
                continue
            await self.write(tag, value)
        self.rows_served += 1
        if self.regmap.row_counter is not None:
            counter = next(t for t in self.regmap.tags if t.name == self.regmap.row_counter)
            await self.write(counter, self.rows_served % 2**32)
        return True

    async def run(self) -> None:
        """Tick at ``rate_hz`` until the file ends (never, when looping)."""
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += period
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if not await self.tick():
                return

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None

    async def __aenter__(self) -> PlcSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
