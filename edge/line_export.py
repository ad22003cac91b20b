"""The ONNX model the site's line serves: the global shared layers with this site's personal ones.

Why the edge builds it (not the aggregator's ONNX): only the site holds its personal layers, and with
``[personal] serve = "pick"`` it chooses among local-only, global, a fine-tune and a blend of local-only with
one of those on its held-out rows (``edge.personal``, ``edge.blend``: a blend is exported as one ONNX graph); those candidates are noise-free, so they are never sent and never trained on by DP rounds.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from edge.personal import Personaliser
from edge.site_state import SiteState
from fedline.logs import event
from models import build_model, export_onnx, load_personal_state, load_shared_state

log = logging.getLogger("fedline.edge")


class LineExport:
    """Writes the line's ONNX into the model directory, one export at a time."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        cfg = state.cfg
        # the line's model picked among local-only / global / fine-tuned on the held-out rows (edge/personal.py)
        self.personaliser = (
            Personaliser(cfg.personal, state.spec, cfg.model_seed) if cfg.personal.serve == "pick" else None
        )
        self._lock = asyncio.Lock()
        self._seed: Any = False  # version 0's parameters for the graph written without torch; False: not looked at

    async def export(self) -> Path | None:
        """Write the personalised ONNX (global shared + local personal) for the line inference.

        Returns None when it could not be written (e.g. disk full): the line keeps its current model.
        """
        st = self.state
        async with self._lock:
            base, personal = st.base, dict(st.personal)
            onnx, served = await asyncio.to_thread(self._build, base.shared, personal, base.version)
            try:
                path = await asyncio.to_thread(
                    st.store.publish_onnx,
                    onnx,
                    site=st.site,
                    version=base.version,
                    spec=st.spec,
                    counter=st.outbox.last_counter(),
                    served=served,
                )
            except OSError as exc:
                event(log, "onnx.export_failed", logging.ERROR, site=st.site, version=base.version, error=str(exc))
                st.error(f"ONNX export failed: {exc}")
                return None
        event(
            log,
            "onnx.exported",
            site=st.site,
            version=base.version,
            path=str(path),
            bytes=len(onnx),
            served=served["kind"] if served else None,
        )
        if served:
            st.changed()
        return path

    def _build(
        self, shared: dict[str, Any], personal: dict[str, Any], version: int | None = None
    ) -> tuple[bytes, dict[str, Any] | None]:
        """The ONNX bytes and, when the site picks, which candidate it serves (in a worker thread). Without a pick,
        the graph is written from the weights where ``models.onnx_graph`` covers the model (the graph torch's
        exporter writes; no ``torch.onnx`` import, a fraction of its CPU per version), else exported with torch."""
        st = self.state
        if self.personaliser is not None:  # noise-free candidates: never sent, never trained on by DP rounds
            from edge.blend_export import export_served

            # the version joins the site's average of recent versions when [personal] average_versions > 1
            chosen, choice = self.personaliser.choose_from(st.dataset, {**shared, **personal}, version)
            return export_served(st.spec, chosen, st.cfg.model_seed), choice.to_dict()
        if (seed := self._seed_params()) is not None:  # written from the weights: no torch.onnx (models.onnx_graph)
            from models.onnx_graph import build_onnx_over

            return build_onnx_over(st.spec, seed, shared, personal), None
        model = build_model(st.spec, seed=st.cfg.model_seed)
        load_shared_state(model, st.spec, shared)
        if personal:
            load_personal_state(model, st.spec, personal)
        return export_onnx(model, st.spec), None

    def _seed_params(self) -> dict[str, Any] | None:
        """Version 0's parameters when ``models.onnx_graph`` writes this model's graph, else None (torch exports)."""
        if self._seed is False:
            from models import onnx_graph
            from models.seed_init import seed_params

            spec = self.state.spec
            self._seed = seed_params(spec, self.state.cfg.model_seed) if onnx_graph.covers(spec) else None
        return self._seed
