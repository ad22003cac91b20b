"""``fedline plant``: the plant's aggregator over its lines, and its uplink to the central federation.

One process, one event loop: :class:`PlantAggregator` is the aggregator
service of the plant's own federation (intake from the lines, receipts, key
epochs, releases on the plant broker: ``aggregator.service`` unchanged) with a
:class:`plant.core.PlantCore` and one more task, the :class:`plant.uplink.Uplink`.
The core's serial thread is the only writer of the plant's state: an adopted
central version is committed there too, and the publisher then releases it to
the lines, signed and sealed with the plant's own keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aggregator.core import AggregatorCore, State
from aggregator.service import Aggregator
from fedline.logs import event
from plant.config import PlantConfig
from plant.core import PlantCore
from plant.metrics import UplinkMetrics
from plant.uplink import Uplink

log = logging.getLogger("fedline.plant")


class PlantAggregator(Aggregator):
    """``await PlantAggregator(cfg).run()`` runs the plant tier until :meth:`stop`."""

    def __init__(self, cfg: PlantConfig) -> None:
        super().__init__(cfg.plant)
        self.plant_cfg = cfg
        self.uplink = Uplink(cfg.upstream, cfg.plant.model, cfg.file, UplinkMetrics(self.metrics.registry))

    def _make_core(self) -> AggregatorCore:
        core = PlantCore(
            self.cfg,
            metrics=self.metrics,
            queue_delta=self.uplink.queue_delta,
            queued_through=self.uplink.queued_through,
        )
        self.uplink.central_version = core.central_version
        self.uplink.metrics.central_version.set(core.central_version)
        self.uplink.shapes = {k: tuple(v.shape) for k, v in core.model.items()}
        return core

    def _manifest_extra(self, version: int) -> dict[str, Any] | None:
        core = self.core
        central = core.upstream_of.get(version) if isinstance(core, PlantCore) else None
        if central is None:
            return None
        return {"upstream": {"federation": self.plant_cfg.upstream.federation, "version": central}}

    async def _adopt(self, central_version: int, shared: State) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        assert isinstance(core, PlantCore)
        await loop.run_in_executor(self._serial, core.adopt, central_version, shared)
        self._new_version.set()  # the publisher releases it to the lines

    async def _queue_waiting(self) -> None:
        core = self.core
        assert isinstance(core, PlantCore)
        await asyncio.get_running_loop().run_in_executor(self._serial, core.queue_pending)

    async def _pending_reduces(self) -> list[Any]:
        core = self.core
        assert isinstance(core, PlantCore)
        return await asyncio.get_running_loop().run_in_executor(self._serial, core.pending_reduces)

    async def run(self) -> None:
        self.uplink.on_model = self._adopt
        self.uplink.on_room = self._queue_waiting
        self.uplink.pending_reduces = self._pending_reduces
        plant = asyncio.create_task(super().run(), name="plant-aggregator")
        started = asyncio.create_task(self.started.wait())
        await asyncio.wait([plant, started], return_when=asyncio.FIRST_COMPLETED)
        if plant.done():
            started.cancel()
            self.uplink.close()
            return plant.result()
        event(
            log,
            "plant.started",
            plant=self.cfg.aggregator.federation,
            site=self.uplink.site,
            central=self.plant_cfg.upstream.federation,
            central_version=self.uplink.central_version,
        )
        up = asyncio.create_task(self.uplink.run(), name="plant-uplink")
        try:
            done, _ = await asyncio.wait([plant, up], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # raises what ended it
        finally:
            self.stop()
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await up
            with contextlib.suppress(asyncio.CancelledError):
                await plant
            self.uplink.close()


async def run_plant(cfg: PlantConfig) -> None:
    """Run until SIGINT/SIGTERM."""
    agg = PlantAggregator(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agg.stop)
    await agg.run()
