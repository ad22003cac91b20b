"""The two yardsticks a federation is judged against, trained in-process without privacy noise.

- **local-only**: each site trains on its own training rows alone. Data that
  never leaves the plant needs no DP noise, so this is the honest alternative
  a plant has to joining a federation.
- **central**: one model on the pooled training rows of every site: the
  reference a federation tries to approach (and which no plant would allow).

Both use the edge agent's own round (:func:`edge.trainer.train_round` with
``dp=None``), so the model, the optimiser, the batch size and the learning
rate are the federation's, and only the data and the noise differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedline.demo.data import DemoData
from models.metrics import score
from models.spec import ModelSpec


@dataclass(frozen=True)
class TrainSettings:
    """How the baselines train: total epochs over their rows, batch, learning rate."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.0
    seed: int = 0


def train_plain(spec: ModelSpec, x: np.ndarray, y: np.ndarray, s: TrainSettings) -> dict[str, np.ndarray]:
    """Train version 0 for ``s.epochs`` epochs without DP: the edge's own local-only candidate
    (:func:`edge.personal.train_local_only`); returns every parameter (shared and personal)."""
    from edge.personal import PersonalConfig, train_local_only

    cfg = PersonalConfig(
        local_epochs=s.epochs, local_lr=s.lr, momentum=s.momentum, batch_size=s.batch_size, seed=s.seed
    )
    return train_local_only(spec, x, y, cfg)


def predict(spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The line's score for rows ``x`` (normalised): probability or value (:func:`edge.personal.predict`)."""
    from edge.personal import predict as personal_predict

    return personal_predict(spec, params, x)


def predict_onnx(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Score rows with an ONNX model in onnxruntime, as the line inference does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": np.ascontiguousarray(x, np.float32)})[0].ravel()


def evaluate(data: DemoData, predict_fn, site_index: int) -> float:
    """Metric on one site's held-out rows, predictions mapped back to plant units."""
    site = data.sites[site_index]
    pred = predict_fn(data.normalise(site.x_test))
    if data.task == "classification":
        return score("roc_auc", site.y_test, pred)
    return score("rmse", site.y_test, data.untarget(pred))


def local_and_central(data: DemoData, spec: ModelSpec, s: TrainSettings) -> tuple[list[float], list[float]]:
    """Metric of each site's local-only model and of the central model, on each site's held-out rows.

    Every model trains on the rows the sites' edges train on (their training
    rows less the validation rows they hold out, :meth:`DemoData.fit_rows`).
    The central model sees the pooled rows for the same number of epochs, so
    it takes as many steps as all local models together.
    """
    local: list[float] = []
    fit = [data.fit_rows(site) for site in data.sites]  # the rows each edge trains on (not its validation rows)
    for i in range(len(data.sites)):
        params = train_plain(spec, fit[i][0], fit[i][1], s)
        local.append(evaluate(data, lambda x, p=params: predict(spec, p, x), i))
    x_all = np.concatenate([f[0] for f in fit])
    y_all = np.concatenate([f[1] for f in fit])
    central_params = train_plain(spec, x_all, y_all, s)
    central = [evaluate(data, lambda x: predict(spec, central_params, x), i) for i in range(len(data.sites))]
    return local, central
