"""The site's privacy budget: an Opacus accountant over every step ever released.

Why here and not inside Opacus's PrivacyEngine: the engine's accountant lives
as long as one training round, but a site's ε must cover every release since
the site was enrolled, across restarts. So the accountant's ``state_dict`` (its
history of ``(noise_multiplier, sample_rate, steps)``) is stored in the outbox
database, in the same transaction that queues the sealed update: a release is
accounted if and only if it exists. Before a round, ε is computed for the
would-be history with the accountant's own ``get_epsilon`` and the round is
skipped when that would exceed the budget.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

from edge.config import PrivacyConfig
from edge.ledger_privacy import RDP_ORDERS
from fedline.opacus_parts import opacus_module


def _accountant(mechanism: str):
    """A fresh accountant for ``mechanism``: the class Opacus's ``create_accountant`` maps it to, imported alone
    (``fedline.opacus_parts``: Opacus's registry imports every accountant, the GDP one with ``scipy.stats``); for
    ``rdp`` :class:`RdpAccountant`, Opacus's RDP accountant computed the same way without its module."""
    if mechanism == "rdp":
        return RdpAccountant()
    if mechanism == "prv":
        return opacus_module("accountants.prv").PRVAccountant()
    return opacus_module("accountants").create_accountant(mechanism)  # the registry: finishes the package


class RdpAccountant:
    """Opacus 1.6's ``RDPAccountant`` for what the budget uses (its history, ``state_dict``, ``load_state_dict``,
    ``get_epsilon``), without importing its module: ``opacus.accountants.rdp`` imports ``accountant.py``, which
    imports every Opacus optimizer and with them ``torch.distributed.tensor`` and SymPy (about 1 s of CPU that the
    rest of a DP process no longer loads: ``edge.dpsgd``). ε is Opacus's: ``compute_rdp`` of every history entry
    at the default orders (``edge.ledger_privacy.RDP_ORDERS``), summed in order, then ``get_privacy_spent``
    (tests/edge/test_dpsgd.py compares it with Opacus's class on several histories)."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    @classmethod
    def mechanism(cls) -> str:
        return "rdp"

    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "mechanism": self.mechanism()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or "history" not in state or "mechanism" not in state:
            raise ValueError("an accountant state needs its history and mechanism")
        if state["mechanism"] != self.mechanism():
            raise ValueError(f"state_dict of {state['mechanism']} cannot be loaded into an rdp accountant")
        self.history = state["history"]

    def get_epsilon(self, delta: float) -> float:
        if not self.history:
            return 0
        analysis = opacus_module("accountants.analysis.rdp")
        orders = list(RDP_ORDERS)
        rdp = sum(
            [
                analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
                for (sigma, q, steps) in self.history
            ]
        )
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)


class PrivacyBudget:
    """ε spent so far and what one more release would cost, for one site."""

    def __init__(self, cfg: PrivacyConfig, state_json: str | None = None, epsilon: float | None = None) -> None:
        self.cfg = cfg
        self.history: list[tuple[float, float, int]] = []
        if state_json:
            state = json.loads(state_json)
            acc = _accountant(cfg.accountant)
            if state.get("mechanism") != acc.mechanism():
                raise ValueError(
                    f"stored privacy history was kept by the {state.get('mechanism')!r} accountant, "
                    f"the configuration asks for {cfg.accountant!r}; ε cannot be carried across"
                )
            acc.load_state_dict(state)
            self.history = [(float(s), float(q), int(n)) for s, q, n in acc.history]
        # cached: computing ε takes 0.1–1 s (PRV); ``epsilon`` may be passed when the caller just computed it
        self._spent = self._epsilon(self.history) if epsilon is None else epsilon

    @staticmethod
    def _merge(
        history: list[tuple[float, float, int]], sigma: float, q: float, steps: int
    ) -> list[tuple[float, float, int]]:
        out = list(history)
        if out and out[-1][0] == sigma and out[-1][1] == q:  # as Opacus's own step() does
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
        return out

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        if not history:
            return 0.0
        acc = _accountant(self.cfg.accountant)
        acc.history = list(history)
        with warnings.catch_warnings():
            # Opacus's advice that the optimal RDP order is at the edge of its alpha grid: the ε it returns is
            # still a valid (if looser) bound; only that advice is dropped, nothing else
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            try:
                return float(acc.get_epsilon(delta=self.cfg.delta))
            except (MemoryError, ValueError, OverflowError):
                # the PRV accountant cannot discretise very large ε; any such ε is over every sane budget
                return math.inf

    @property
    def epsilon(self) -> float:
        """ε spent by every release so far (at the configured δ)."""
        return self._spent

    def epsilon_after(self, sample_rate: float, steps: int) -> float:
        """ε if one more release of ``steps`` steps at ``sample_rate`` were made."""
        return self._epsilon(self._merge(self.history, self.cfg.noise_multiplier, sample_rate, steps))

    def allows(self, sample_rate: float, steps: int) -> bool:
        """Whether that release stays within the configured ε."""
        return self.epsilon_after(sample_rate, steps) <= self.cfg.epsilon

    def state_after(self, sample_rate: float, steps: int) -> str:
        """The accountant ``state_dict`` (JSON) including that release, to store with the update."""
        acc = _accountant(self.cfg.accountant)
        acc.history = self._merge(self.history, self.cfg.noise_multiplier, sample_rate, steps)
        state: dict[str, Any] = dict(acc.state_dict())
        return json.dumps({"history": [list(h) for h in state["history"]], "mechanism": state["mechanism"]})

    def commit(self, state_json: str, epsilon: float | None = None) -> None:
        """Adopt a state returned by :meth:`state_after` once it is stored (``epsilon``: its ε, if known)."""
        self.__init__(self.cfg, state_json, epsilon)  # type: ignore[misc]
