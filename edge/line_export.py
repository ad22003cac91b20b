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
        """The ONNX bytes and, when the site picks, which candidate it serves (in a worker thread: torch work)."""
        st = self.state
        if self.personaliser is not None:  # noise-free candidates: never sent, never trained on by DP rounds
            from edge.blend_export import export_served

            # the version joins the site's average of recent versions when [personal] average_versions > 1
            chosen, choice = self.personaliser.choose_from(st.dataset, {**shared, **personal}, version)
            return export_served(st.spec, chosen, st.cfg.model_seed), choice.to_dict()
        model = build_model(st.spec, seed=st.cfg.model_seed)
        load_shared_state(model, st.spec, shared)
        if personal:
            load_personal_state(model, st.spec, personal)
        return export_onnx(model, st.spec), None
