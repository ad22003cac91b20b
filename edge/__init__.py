"""The edge agent of a site (and, in ``edge.inference``, the line inference).

Importing ``edge`` loads nothing heavy: the line inference lives under this
package and must not pull torch in. The agent is in :mod:`edge.agent`
(``EdgeAgent``, ``run_agent``: the wiring of its tasks, one a module, listed
there), its configuration in :mod:`edge.config`, the
local dataset in :mod:`edge.dataset`, DP-SGD rounds in :mod:`edge.trainer`,
the privacy budget in :mod:`edge.privacy`, store-and-forward in
:mod:`edge.outbox`, models on disk in :mod:`edge.model_store`.
"""

from __future__ import annotations

from typing import Any


async def run_agent(config: Any, stop: Any = None) -> None:
    """Run one edge agent (see :func:`edge.agent.run_agent`); imports torch on first call."""
    from edge.agent import run_agent as _run

    await _run(config, stop)
