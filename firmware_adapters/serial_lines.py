"""Serial-line sensors (pyserial): one reading per text line.

Line protocols (``protocol`` in the source table):

- ``csv``: ``21.5,1500,0`` with ``columns = ["temp", "rpm", "alarm"]`` (or a
  header line with ``header = true``);
- ``jsonl``: ``{"temp": 21.5, "rpm": 1500}`` (nested objects flatten to ``a.b``);
- ``kv``: ``temp=21.5 rpm=1500`` (pairs split by spaces, commas or semicolons).

A line that cannot be decoded or parsed, or that exceeds ``max_line_bytes``
without a newline (a baud-rate or parity mismatch produces exactly that), is a
framing error: counted in ``stats.bad_reads`` and ``stats.extra["framing_errors"]``
and yielded as a bad sample; the reader resynchronises at the next newline. A
port that cannot be opened or goes away (USB adapter unplugged) is retried with
backoff forever, counting ``gaps`` and ``reconnects``.

``port`` is a device path or any pyserial URL (``loop://``, ``socket://host:port``,
``rfc2217://...``). pyserial is blocking, so reads run in a worker thread with
a short timeout; serial rates are far below what that costs.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fedline.logs import event
from firmware_adapters.backoff import Backoff
from firmware_adapters.config import SerialLineConfig
from firmware_adapters.csv_replay import parse_number
from firmware_adapters.sample import Sample, SourceStats, Value

log = logging.getLogger("fedline.adapters.serial")

_KV_SPLIT = re.compile(r"[\s,;]+")


class FramingError(ValueError):
    """A line that does not follow the configured protocol."""


def _scalar(v: Any) -> Value:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise FramingError(f"unsupported value {v!r}")


def flatten(obj: dict[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Value]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are not tags and raise FramingError."""
    out: dict[str, Value] = {}
    for k, v in obj.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, sep, key))
        else:
            out[key] = _scalar(v)
    return out


def _text_value(text: str) -> Value:
    try:
        return parse_number(text)
    except ValueError:
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        return text.strip()


class LineParser:
    """Turns one decoded line into ``tag -> value`` per the configured protocol."""

    def __init__(self, cfg: SerialLineConfig) -> None:
        self.cfg = cfg
        self.columns: list[str] | None = list(cfg.columns) if cfg.columns else None
        self._need_header = cfg.protocol == "csv" and cfg.header and not cfg.columns

    def parse(self, line: str) -> dict[str, Value] | None:
        """Values of one line; None for a line that carries none (header, blank)."""
        if not line.strip():
            return None
        p = self.cfg.protocol
        if p == "jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FramingError(f"not JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise FramingError("a JSON line must be an object")
            return flatten(obj)
        if p == "kv":
            out: dict[str, Value] = {}
            for pair in _KV_SPLIT.split(line.strip()):
                key, sep, value = pair.partition(self.cfg.pair_separator)
                if not sep or not key:
                    raise FramingError(f"not key{self.cfg.pair_separator}value: {pair!r}")
                out[key] = _text_value(value)
            return out
        fields = next(csv.reader(io.StringIO(line), delimiter=self.cfg.delimiter))
        if self._need_header:
            self.columns = [f.strip() for f in fields]
            self._need_header = False
            return None
        assert self.columns is not None
        if len(fields) != len(self.columns):
            raise FramingError(f"{len(fields)} fields, expected {len(self.columns)}")
        return {c: _text_value(f) for c, f in zip(self.columns, fields)}


class SerialLineSource:
    """``async for sample in SerialLineSource(cfg)``; see the module docstring."""

    def __init__(self, cfg: SerialLineConfig) -> None:
        self.cfg = cfg
        self.name = cfg.source_name
        self.stats = SourceStats()
        self.parser = LineParser(cfg)
        self._ser: Any = None

    def _open(self) -> Any:
        import serial

        return serial.serial_for_url(
            self.cfg.port,
            baudrate=self.cfg.baudrate,
            bytesize=self.cfg.bytesize,
            parity=self.cfg.parity,
            stopbits=self.cfg.stopbits,
            timeout=0.1,
        )

    def _read_some(self) -> bytes:
        ser = self._ser
        return ser.read(max(1, ser.in_waiting))

    def _framing_error(self, why: str) -> Sample:
        self.stats.bad_reads += 1
        self.stats.bump("framing_errors")
        event(log, "serial.framing_error", logging.DEBUG, source=self.name, error=why)
        return Sample.bad(self.name, f"framing: {why}")

    def _line_sample(self, raw: bytes) -> Sample | None:
        try:
            line = raw.decode(self.cfg.encoding).rstrip("\r")
            values = self.parser.parse(line)
        except UnicodeDecodeError:
            return self._framing_error("undecodable bytes")
        except (FramingError, csv.Error) as exc:
            return self._framing_error(str(exc))
        if values is None:
            return None
        ts = time.time()
        if self.cfg.ts_key is not None and self.cfg.ts_key in values:
            tsv = values.pop(self.cfg.ts_key)
            if isinstance(tsv, (int, float)) and not isinstance(tsv, bool):
                ts = float(tsv)
        self.stats.reads += 1
        return Sample(ts=ts, source=self.name, values=values)

    def close(self) -> None:
        if self._ser is not None:
            try:
                self._ser.close()
            except Exception:  # a vanished device may fail to close; it is gone either way
                pass
            self._ser = None

    async def aclose(self) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[Sample]:
        backoff = Backoff(self.cfg.reconnect_initial_s, self.cfg.reconnect_max_s)
        buf = bytearray()
        discarding = False  # after an overlong line: drop bytes up to the next newline
        down = False  # in an outage: counted once in gaps, ended by a reconnect
        try:
            while True:
                if self._ser is None:
                    try:
                        self._ser = await asyncio.to_thread(self._open)
                    except (OSError, ValueError) as exc:  # SerialException is an OSError
                        if not down:
                            down = True
                            self.stats.gaps += 1
                            yield Sample.bad(self.name, f"cannot open {self.cfg.port}: {exc}")
                        await asyncio.sleep(backoff.next())
                        continue
                    if down:
                        down = False
                        self.stats.reconnects += 1
                    backoff.reset()
                    buf.clear()
                try:
                    chunk = await asyncio.to_thread(self._read_some)
                except (OSError, ValueError, TypeError) as exc:  # device vanished mid-read
                    event(log, "serial.lost", logging.WARNING, source=self.name, error=str(exc))
                    self.close()
                    down = True
                    self.stats.gaps += 1
                    yield Sample.bad(self.name, f"lost {self.cfg.port}: {exc}")
                    continue
                if not chunk:
                    continue
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    raw = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if discarding:
                        discarding = False
                        continue
                    sample = self._line_sample(raw)
                    if sample is not None:
                        yield sample
                if len(buf) > self.cfg.max_line_bytes:
                    buf.clear()
                    discarding = True
                    yield self._framing_error(f"no newline within {self.cfg.max_line_bytes} bytes")
        finally:
            self.close()
