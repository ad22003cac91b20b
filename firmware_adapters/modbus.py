"""Modbus TCP and RTU sources (pymodbus 3.x async clients).

Each polling group (tags sharing ``group``; interval from ``poll_interval_s`` or
``group_intervals_s``) is read with as few requests as the protocol allows
(:func:`firmware_adapters.registers.plan_reads`) and yields one :class:`Sample`.

Failure handling, because a line PC must outlive its PLC:

- a request that fails while connected (timeout, exception response) yields a
  bad-quality sample and counts ``bad_reads``; polling goes on;
- a lost connection yields one bad sample, counts one ``gap``, and reconnects
  with jittered exponential backoff forever; each success counts ``reconnects``;
- with a ``row_counter`` tag in the map, a poll that sees the same counter is a
  repeat (counted, not yielded) and a jump of k counts ``skipped += k-1``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fedline.logs import event
from firmware_adapters.backoff import Backoff
from firmware_adapters.config import ModbusRtuConfig, ModbusTcpConfig, register_map_of
from firmware_adapters.registers import ReadBlock, RegisterMap, TagSpec, decode, plan_reads
from firmware_adapters.sample import Sample, SourceStats, Value

log = logging.getLogger("fedline.adapters.modbus")

_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}


class _ReadFailed(Exception):
    """One request failed but the connection is still up."""


class ModbusSource:
    """``async for sample in ModbusSource(cfg, regmap)``; see the module docstring."""

    def __init__(self, cfg: ModbusTcpConfig | ModbusRtuConfig, regmap: RegisterMap) -> None:
        self.cfg = cfg
        self.regmap = regmap
        self.name = cfg.source_name
        self.stats = SourceStats()
        self._groups: dict[str, list[ReadBlock]] = {
            g: plan_reads(tags, cfg.max_gap) for g, tags in regmap.groups().items()
        }
        self._intervals = {g: cfg.group_intervals_s.get(g, cfg.poll_interval_s) for g in self._groups}
        self._client: Any = None
        self._last_counter: int | None = None

    @classmethod
    def from_config(
        cls, cfg: ModbusTcpConfig | ModbusRtuConfig, file: str | Path | None = None, where: str = "sources"
    ) -> ModbusSource:
        return cls(cfg, register_map_of(cfg, file, where))

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """Engineering ranges from the register map (for row normalisation)."""
        return self.regmap.ranges()

    def requests_per_poll(self) -> dict[str, int]:
        """How many Modbus requests each group's poll takes (after merging)."""
        return {g: len(blocks) for g, blocks in self._groups.items()}

    # ------------------------------------------------------------ connection

    def _make_client(self) -> Any:
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

        # reconnect_delay=0: we own reconnection (backoff, counters, bad samples)
        if isinstance(self.cfg, ModbusTcpConfig):
            return AsyncModbusTcpClient(
                self.cfg.host,
                port=self.cfg.port,
                timeout=self.cfg.timeout_s,
                retries=self.cfg.retries,
                reconnect_delay=0,
            )
        return AsyncModbusSerialClient(
            self.cfg.port,
            baudrate=self.cfg.baudrate,
            bytesize=self.cfg.bytesize,
            parity=self.cfg.parity,
            stopbits=self.cfg.stopbits,
            timeout=self.cfg.timeout_s,
            retries=self.cfg.retries,
            reconnect_delay=0,
        )

    async def _connect(self) -> bool:
        self._close()
        self._client = self._make_client()
        try:
            ok = await self._client.connect()
        except Exception as exc:  # pymodbus raises several kinds; all mean "not now"
            event(log, "modbus.connect_failed", logging.DEBUG, source=self.name, error=repr(exc))
            ok = False
        return bool(ok) and bool(self._client.connected)

    def _close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a half-dead transport must not raise out of a poll loop
                pass
            self._client = None

    async def aclose(self) -> None:
        self._close()

    # ------------------------------------------------------------ reading

    async def _read_block(self, block: ReadBlock) -> list[int] | list[bool]:
        from pymodbus.exceptions import ConnectionException, ModbusIOException

        reader = getattr(self._client, _READERS[block.table])
        try:
            rr = await reader(block.address, count=block.count, device_id=self.cfg.device_id)
        except ConnectionException:
            raise
        except ModbusIOException as exc:
            if not self._client.connected:
                raise ConnectionException(str(exc)) from exc
            raise _ReadFailed(f"{block.table}@{block.address}: {exc}") from exc
        if rr.isError():
            raise _ReadFailed(f"{block.table}@{block.address}x{block.count}: {rr}")
        raw = list(rr.bits[: block.count]) if block.table in ("coil", "discrete") else list(rr.registers)
        if len(raw) < block.count:  # a device answering short must not crash the decoder
            raise _ReadFailed(f"{block.table}@{block.address}: {len(raw)} of {block.count} values returned")
        return raw

    async def poll_group(self, group: str) -> dict[str, Value]:
        """Read every tag of ``group`` once (raises on failure)."""
        values: dict[str, Value] = {}
        for block in self._groups[group]:
            raw = await self._read_block(block)
            for tag in block.tags:
                start = tag.address - block.address
                try:
                    values[tag.name] = decode(self.regmap, tag, raw[start : start + tag.words])
                except ValueError as exc:  # a string tag whose bytes are not UTF-8
                    raise _ReadFailed(f"{tag.name!r} ({tag.type}) at {tag.table}@{tag.address}: {exc}") from exc
        return values

    def _check_counter(self, values: dict[str, Value]) -> bool:
        """False if this poll repeats the last row (per the row counter)."""
        name = self.regmap.row_counter
        if name is None or name not in values:
            return True
        counter = int(values[name])  # type: ignore[arg-type]
        last, self._last_counter = self._last_counter, counter
        if last is None:
            return True
        if counter == last:
            self.stats.repeats += 1
            return False
        if counter > last + 1:
            self.stats.skipped += counter - last - 1
        return True

    async def __aiter__(self) -> AsyncIterator[Sample]:
        from pymodbus.exceptions import ConnectionException

        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        due = {g: time.monotonic() for g in self._groups}
        connected = await self._connect()
        if not connected:
            self.stats.gaps += 1
            yield Sample.bad(self.name, "cannot connect")
        try:
            while True:
                if not connected:
                    await asyncio.sleep(backoff.next())
                    connected = await self._connect()
                    if not connected:
                        continue
                    self.stats.reconnects += 1
                    backoff.reset()
                    event(log, "modbus.reconnected", source=self.name, reconnects=self.stats.reconnects)
                group = min(due, key=due.__getitem__)
                delay = due[group] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                due[group] = max(due[group] + self._intervals[group], time.monotonic())
                try:
                    values = await self.poll_group(group)
                except _ReadFailed as exc:
                    self.stats.bad_reads += 1
                    yield Sample.bad(self.name, str(exc))
                    continue
                except (TimeoutError, ConnectionException, OSError) as exc:
                    connected = False
                    self.stats.gaps += 1
                    event(log, "modbus.connection_lost", logging.WARNING, source=self.name, error=str(exc))
                    self._close()
                    yield Sample.bad(self.name, f"connection lost: {exc}")
                    continue
                if self._check_counter(values):
                    self.stats.reads += 1
                    yield Sample(ts=time.time(), source=self.name, values=values)
        finally:
            self._close()


__all__ = ["ModbusSource", "TagSpec"]
