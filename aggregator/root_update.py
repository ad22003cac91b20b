"""FLTrust's server update ``g_0``: the aggregator trains the current global model on its own root rows.

Why here and why these rows: FLTrust (Cao et al., "FLTrust: Byzantine-robust Federated Learning via
Trust Bootstrapping", NDSS 2021, Alg. 2) gives the server a small clean *root dataset* and, each round,
trains from the current global model on it exactly as a client trains (``ModelUpdate(w, D_0, b, β, R_l)``);
the resulting update is the direction every site's update is measured against
(:func:`aggregator.strategies.aggregate.fltrust_combination`). The aggregator never sees plant data, so
the root set is the ``[evaluation]`` rows the operator already gives it (public or the operator's own
rows, built by the same :class:`firmware_adapters.rows.RowBuilder` mapping as a site's, so scaled alike).

How it trains: plain SGD (the rows are the aggregator's own: no DP noise, nothing to protect) with the
federation's ``[dp]`` learning rate, momentum, batch size and step count, i.e. the training the sites are
told to run, so ``‖g_0‖`` is the size of an honest update (FLTrust rescales every update to it). Batches
are drawn without replacement per pass over the rows; the generator is seeded from the aggregator's seed
and the version trained from, so a restarted aggregator computes the same ``g_0`` for the same version.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.config import DPConfig

State = dict[str, np.ndarray]


class RootUpdate:
    """``g_0 = w' − w`` after ``[dp] steps`` SGD steps on the root rows from the shared weights ``w``."""

    def __init__(self, spec: Any, x: np.ndarray, y: np.ndarray | None, dp: DPConfig, seed: int) -> None:
        if len(x) == 0:
            raise ValueError("the root dataset is empty")
        self.spec, self.x, self.y, self.dp, self.seed = spec, x, y, dp, seed

    def __call__(self, shared: State) -> State:
        import torch

        from models import build_model, load_shared_state, loss_per_sample, shared_state

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + _fingerprint(shared))
        model = build_model(self.spec, seed=self.seed)
        load_shared_state(model, self.spec, shared)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.dp.lr, momentum=self.dp.momentum)
        x = torch.from_numpy(np.ascontiguousarray(self.x, np.float32))
        y = None if self.y is None else torch.from_numpy(np.ascontiguousarray(self.y, np.float32))
        batch = min(self.dp.batch_size, len(x))
        order = torch.randperm(len(x), generator=gen)
        at = 0
        for _ in range(self.dp.steps):
            if at + batch > len(x):  # a new pass over the rows
                order, at = torch.randperm(len(x), generator=gen), 0
            idx = order[at : at + batch]
            at += batch
            opt.zero_grad()
            loss_per_sample(model, self.spec, x[idx], None if y is None else y[idx]).mean().backward()
            opt.step()
        new = shared_state(model, self.spec)
        return {k: (new[k] - np.asarray(shared[k], np.float32)).astype(np.float32) for k in shared}


def _fingerprint(shared: State) -> int:
    """A small integer from the weights (the same model gives the same batches): 31 bits of their sum's bytes."""
    total = float(sum(float(np.asarray(v, np.float64).sum()) for v in shared.values()))
    return int.from_bytes(np.float64(total).tobytes()[:4], "little") & 0x7FFFFFFF
