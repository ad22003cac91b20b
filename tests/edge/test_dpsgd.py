"""``edge.dpsgd.DPSGD``: DP-SGD's step as Opacus's ``DPOptimizer`` over torch's ``SGD`` computes it, bit for bit.

The reference is Opacus's own optimizer (imported here, in the test process, through ``fedline.opacus_parts``) over
torch's SGD, given the same model, the same per-sample gradients and a noise generator in the same state; the
hand-worked cases check the clipping, averaging and momentum arithmetic from DP-SGD's definition (Abadi et al.
2016, Algorithm 1: ``g̃ = (Σ_i g_i · min(1, C/‖g_i‖) + N(0, σ²C²)) / B``) without either library.
"""

from __future__ import annotations

import pytest
import torch

from edge.dpsgd import DPSGD
from edge.ledger_privacy import RDP_ORDERS
from fedline.opacus_parts import opacus_module

# Opacus's per-sample gradients on a first layer whose input needs no gradient: torch's note, expected
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = (torch.rand(40, 1, generator=g) > 0.5).float()
    # the third step is an empty Poisson batch: pure noise, as the trainer runs it
    return [torch.cat([x[:7], y[:7]], 1), torch.cat([x[7:19], y[7:19]], 1), x[:0], torch.cat([x[19:], y[19:]], 1)]


def _dp_run(use_ours: bool, secure: bool, momentum: float) -> list[list[torch.Tensor]]:
    """Four steps of DP-SGD; the parameters after each."""
    model = _model()
    gsm = opacus_module("grad_sample.grad_sample_module").GradSampleModule(
        model, batch_first=True, loss_reduction="mean"
    )
    noise = torch.Generator().manual_seed(42)
    kw = {"noise_multiplier": 1.1, "max_grad_norm": 0.7, "expected_batch_size": 10, "generator": noise}
    if use_ours:
        opt = DPSGD(model.parameters(), lr=0.3, momentum=momentum, secure_mode=secure, **kw)
    else:
        sgd = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
        opt = opacus_module("optimizers.optimizer").DPOptimizer(sgd, loss_reduction="mean", secure_mode=secure, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    after = []
    for batch in _batches():
        opt.zero_grad(set_to_none=True)
        if len(batch) == 0:
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            out = gsm(batch[:, :5])
            torch.nn.functional.binary_cross_entropy_with_logits(out, batch[:, 5:]).backward()
        opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    gsm._close()
    return after


@pytest.mark.parametrize(("secure", "momentum"), [(False, 0.9), (True, 0.9), (False, 0.0)])
def test_the_same_parameters_as_opacus_over_torch_sgd_bit_for_bit(secure: bool, momentum: float) -> None:
    ours, theirs = _dp_run(True, secure, momentum), _dp_run(False, secure, momentum)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for pa, pb in zip(a, b, strict=True):
            assert torch.equal(pa, pb), f"step {step} differs"
    assert not torch.equal(ours[-1][0], _model()[0].weight)  # it trained
    # the noise matters: another generator state gives other parameters (the comparison above can fail)
    assert not torch.equal(_dp_run(True, not secure, momentum)[0][0], ours[0][0])


def test_without_noise_the_same_steps_as_torch_sgd() -> None:
    runs = []
    for use_ours in (True, False):
        model = _model(3)
        opt = (
            DPSGD(model.parameters(), lr=0.2, momentum=0.9)
            if use_ours
            else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        )
        for batch in _batches():
            if len(batch) == 0:
                continue
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(batch[:, :5]), batch[:, 5:]).backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert getattr(opt, "noise_steps", 0) == 0
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_clip_average_and_momentum_worked_by_hand() -> None:
    """One weight, per-sample gradients 3 and 0.5, C = 1, no noise (σ = 0), B = 2, lr 0.1, momentum 0.5:
    step 1 clips 3 to 1/(3 + 1e-6)·3 ≈ 1 and keeps 0.5: g̃ = 1.5 / 2 = 0.75, w = 1 − 0.075 = 0.925;
    step 2 with gradients −2 (clipped to −1) and 0: g̃ = −0.5, buffer 0.5·0.75 − 0.5 = −0.125, w = 0.9375."""
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = DPSGD([w], lr=0.1, momentum=0.5, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2)
    w.grad_sample = torch.tensor([[3.0], [0.5]])
    opt.step()
    assert w.item() == pytest.approx(1 - 0.1 * (3 / (3 + 1e-6) + 0.5) / 2, abs=1e-7)
    assert w.item() == pytest.approx(0.925, abs=1e-6)
    opt.zero_grad()
    w.grad_sample = torch.tensor([[-2.0], [0.0]])
    opt.step()
    assert w.item() == pytest.approx(0.925 - 0.1 * (0.5 * 0.75 - 0.5), abs=1e-6)
    assert w.item() == pytest.approx(0.9375, abs=1e-6)
    assert opt.noise_steps == 2


def test_the_noise_has_the_mechanisms_scale() -> None:
    """Zero gradients, σ = 2, C = 0.5, B = 1, lr 1: each step moves the weights by −N(0, (σC)² = 1)."""
    w = torch.nn.Parameter(torch.zeros(20_000))
    opt = DPSGD([w], lr=1.0, noise_multiplier=2.0, max_grad_norm=0.5, generator=torch.Generator().manual_seed(0))
    w.grad_sample = torch.zeros((3, 20_000))
    opt.step()
    assert float(w.detach().std()) == pytest.approx(1.0, abs=0.02)
    assert abs(float(w.detach().mean())) < 0.03


def test_a_gradient_is_never_used_twice() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    opt = DPSGD([w], lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0)
    w.grad_sample = torch.ones((1, 2))
    opt.step()
    with pytest.raises(ValueError, match="zero_grad"):
        opt.step()
    opt.zero_grad()
    assert w.grad is None and w.grad_sample is None
    with pytest.raises(ValueError, match="per-sample"):
        opt.step()


def test_two_passes_before_a_step_as_opacus_accumulates_them() -> None:
    runs = []
    for use_ours in (True, False):
        model = _model(5)
        gsm = opacus_module("grad_sample.grad_sample_module").GradSampleModule(model, loss_reduction="mean")
        kw = {"noise_multiplier": 0.8, "max_grad_norm": 1.0, "expected_batch_size": 6}
        kw["generator"] = torch.Generator().manual_seed(9)
        if use_ours:
            opt = DPSGD(model.parameters(), lr=0.5, **kw)
        else:
            sgd = torch.optim.SGD(model.parameters(), lr=0.5)
            opt = opacus_module("optimizers.optimizer").DPOptimizer(sgd, loss_reduction="mean", **kw)
        b = _batches()[1]
        opt.zero_grad()
        for half in (b[:6], b[6:]):  # two backward passes: the per-sample gradients become a list of two
            torch.nn.functional.mse_loss(gsm(half[:, :5]), half[:, 5:]).backward()
        opt.step()
        gsm._close()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_the_rdp_orders_are_opacus_defaults() -> None:
    assert list(RDP_ORDERS) == opacus_module("accountants.rdp").RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize(
    "history",
    [[], [(1.0, 0.1, 20)], [(1.5, 0.03, 66), (1.5, 0.03, 66), (0.8, 0.5, 3)], [(4.0, 1.0, 1)], [(0.6, 0.01, 5000)]],
)
def test_the_budgets_rdp_accountant_is_opacus_rdp_accountant(history: list[tuple[float, float, int]]) -> None:
    from edge.privacy import RdpAccountant

    ours, theirs = RdpAccountant(), opacus_module("accountants.rdp").RDPAccountant()
    ours.history, theirs.history = list(history), list(history)
    for delta in (1e-5, 1e-3):
        assert ours.get_epsilon(delta=delta) == theirs.get_epsilon(delta=delta)
    assert ours.state_dict() == dict(theirs.state_dict())
    loaded = RdpAccountant()
    loaded.load_state_dict(dict(theirs.state_dict()))
    assert loaded.history == theirs.history
    with pytest.raises(ValueError, match="prv"):
        loaded.load_state_dict({"history": [], "mechanism": "prv"})
