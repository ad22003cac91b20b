"""An edge's start without waste: Opacus's parts without its every accountant, the collector out of the way.

Each check that depends on what a process has imported runs in a fresh Python process (this one has imported
everything already).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedline.testing.patience import bound
from tests.conftest import eventually
from tests.edge.helpers import Federation, write_csv, write_site

REPO = Path(__file__).resolve().parents[2]


def _child(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=bound(240))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_DP_ROUND = """
import json, sys
import numpy as np
from edge.config import PrivacyConfig, TrainingConfig
from edge.ledger_privacy import RecordLedger
from edge.privacy import PrivacyBudget, _accountant
from edge.trainer import preload, train_round
from fedline.opacus_parts import is_deferred
from models import ModelSpec, build_model, shared_state

preload(True)
dp = PrivacyConfig(epsilon=50.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0)
ledger = RecordLedger(dp)
eps_rdp = PrivacyBudget(dp).epsilon_after(0.1, 20)
spec = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4], "task": "classification"})
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 3)).astype(np.float32)
y = (x[:, :1] > 0).astype(np.float32)
base = shared_state(build_model(spec, seed=0), spec)
r = train_round(spec, base, None, x, y, TrainingConfig(epochs=2, batch_size=16, lr=0.1), dp)
gru = build_model(ModelSpec(kind="gru", n_features=3, hidden=[4], window=5), seed=0)  # Opacus's DPGRU
import opacus
probe = hasattr(opacus, "__wrapped__")
lean = {
    "scipy_stats": "scipy.stats" in sys.modules,
    "scipy_optimize": "scipy.optimize" in sys.modules,
    "gdp": "opacus.accountants.gdp" in sys.modules,
    "deferred": [is_deferred("opacus"), is_deferred("opacus.accountants")],
    "probe": probe,
    "noise_steps": r.noise_steps,
    "planned": r.plan.steps,
    "gru_body": type(gru.body).__module__,
}
# the legacy global budget's PRV accountant (it needs scipy's signal and integrate, which load scipy.stats)
eps_prv = PrivacyBudget(PrivacyConfig(epsilon=50.0, delta=1e-5, noise_multiplier=1.0, accountant="prv")).epsilon_after(0.1, 20)
prv_acc = _accountant("prv")
lean["deferred_after_prv"] = [is_deferred("opacus"), is_deferred("opacus.accountants")]
# anything else in the process asks the packages for their names: they finish themselves, same classes
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant, create_accountant
import opacus.accountants.prv as prv_mod
import opacus.accountants.rdp as rdp_mod
import opacus.grad_sample.grad_sample_module as gsm
full = create_accountant("rdp")
full.history = [(1.0, 0.1, 20)]
from importlib.metadata import version
print(json.dumps({
    "lean": lean,
    "same_gsm": GradSampleModule is gsm.GradSampleModule,
    "same_rdp": RDPAccountant is rdp_mod.RDPAccountant and type(full) is rdp_mod.RDPAccountant,
    "same_prv": type(prv_acc) is prv_mod.PRVAccountant is PRVAccountant,
    "eps_prv": eps_prv,
    "eps_rdp": eps_rdp,
    "eps_full": full.get_epsilon(delta=1e-5),
    "version": [opacus.__version__, version("opacus")],
    "engine": PrivacyEngine.__module__,
    "gaussian": GaussianAccountant.__module__,
    "deferred_after": [is_deferred("opacus"), is_deferred("opacus.accountants")],
    "scipy_stats_after": "scipy.stats" in sys.modules,
}))
"""


def test_a_dp_round_loads_no_gdp_accountant_and_opacus_still_imports_whole_later() -> None:
    got = _child(_DP_ROUND)
    lean = got["lean"]
    # the round and its RDP ledger and budget ran on Opacus without its package inits: no GDP accountant
    assert lean["scipy_stats"] is False and lean["scipy_optimize"] is False and lean["gdp"] is False
    assert lean["deferred"] == [True, True]
    assert lean["deferred_after_prv"] == [True, True]  # the PRV accountant alone does not finish them either
    assert lean["probe"] is False  # a dunder probe (copy, inspect) does not finish the package
    assert lean["noise_steps"] == lean["planned"] > 0  # DP-SGD ran: every planned step added its noise
    assert lean["gru_body"].startswith("opacus.layers")  # a GRU model's Opacus layer came the same way
    # then `from opacus import ...` anywhere: the package inits run in place, the classes are the same objects
    assert got["same_gsm"] and got["same_rdp"] and got["same_prv"]
    assert got["eps_rdp"] == got["eps_full"] > 0  # the accountant is Opacus's own: the same ε
    assert 0 < got["eps_prv"] < 50
    assert got["version"][0] == got["version"][1]
    assert got["engine"] == "opacus.privacy_engine" and got["gaussian"] == "opacus.accountants.gdp"
    assert got["deferred_after"] == [False, False] and got["scipy_stats_after"] is True


def test_an_edges_rounds_import_neither_dynamo_nor_opacus_optimizers() -> None:
    """What an edge's start and its rounds load (``edge.trainer.preload``, the record ledger, the legacy global
    budget, a DP round and a noise-free one, the line's ONNX export): not ``torch._dynamo`` (torch's optimizers), not Opacus's optimizers
    with ``torch.distributed.tensor`` and SymPy (``edge.dpsgd`` computes their step)."""
    got = _child(
        """
import json, sys
import numpy as np
from edge.config import PrivacyConfig, TrainingConfig
from edge.ledger_privacy import RecordLedger
from edge.trainer import preload, train_round
from models import ModelSpec, build_model, shared_state
from models.export import export_onnx

preload(True)
dp = PrivacyConfig(epsilon=50.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0)
ledger = RecordLedger(dp)
eps = ledger._eps(ledger._unit(0.1, 1.0) * 20)
from edge.privacy import PrivacyBudget  # the legacy global budget (and the plain loop's): Opacus's RDP, computed
eps_global = PrivacyBudget(dp).epsilon_after(0.1, 20)
spec = ModelSpec.from_dict({"kind": "mlp", "n_features": 3, "hidden": [4], "task": "classification"})
x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
y = (x[:, :1] > 0).astype(np.float32)
model = build_model(spec, seed=0)
base = shared_state(model, spec)
r = train_round(spec, base, None, x, y, TrainingConfig(epochs=2, batch_size=16, lr=0.1, momentum=0.9), dp)
train_round(spec, base, None, x, y, TrainingConfig(epochs=1, batch_size=16, lr=0.1), None)
onnx = export_onnx(model, spec)
names = ("torch._dynamo", "torch.distributed.tensor", "sympy", "opacus.optimizers", "opacus.accountants.accountant")
print(json.dumps({"loaded": [n for n in names if n in sys.modules], "eps": eps, "eps_global": eps_global,
                  "noise_steps": r.noise_steps,
                  "planned": r.plan.steps, "onnx": len(onnx)}))
"""
    )
    assert got["loaded"] == []
    assert got["noise_steps"] == got["planned"] > 0 and got["onnx"] > 100
    assert got["eps"] == pytest.approx(got["eps_global"], rel=1e-9) and got["eps"] > 0  # one history, two ways


def test_plain_opacus_import_first_leaves_it_alone() -> None:
    got = _child(
        """
import json, sys
import opacus
from fedline.opacus_parts import defer_package_inits, is_deferred
defer_package_inits()
print(json.dumps({"deferred": is_deferred("opacus"), "same": sys.modules["opacus"] is opacus,
                  "engine": hasattr(opacus, "PrivacyEngine")}))
"""
    )
    assert got == {"deferred": False, "same": True, "engine": True}


def test_collector_paused_then_frozen_and_restored() -> None:
    got = _child(
        """
import gc, json
from fedline.startup import collector_paused
gc.enable()
before = gc.get_freeze_count()
with collector_paused():
    inside = gc.isenabled()
    kept = [[i] for i in range(50_000)]
on_after, frozen = gc.isenabled(), gc.get_freeze_count()
gc.unfreeze()
gc.disable()
try:
    with collector_paused():
        raise RuntimeError("a failed start")
except RuntimeError:
    pass
print(json.dumps({"inside": inside, "on_after": on_after, "added": frozen - before,
                  "off_stays_off": not gc.isenabled(), "frozen_on_error": gc.get_freeze_count() > 50_000}))
"""
    )
    assert got["inside"] is False and got["on_after"] is True
    assert got["added"] >= 50_000  # what the block made is frozen (the permanent generation)
    assert got["off_stays_off"] is True and got["frozen_on_error"] is True


async def test_the_edge_process_logs_its_start_cost_with_the_start_frozen(mosquitto, tmp_path) -> None:
    """``fedline edge`` pauses the collector over its imports and construction and freezes them: the frozen
    count covers torch and Opacus (hundreds of thousands of objects), and the start's CPU is logged."""
    site = "site-a"
    fed = Federation.create(tmp_path, [site])
    csv = write_csv(tmp_path / "rows.csv", 100)
    path = write_site(fed, site, csv, mosquitto.url, mosquitto.paths[f"password:{site}"])
    log = tmp_path / "edge.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedline.cli", "edge", "--config", str(path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        await eventually(lambda: "edge.start_cost" in log.read_text(), timeout=120)
        line = next(ln for ln in log.read_text().splitlines() if "edge.start_cost" in ln)
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert fields["site"] == site
        assert float(fields["cpu_s"]) > 0.1
        assert int(fields["frozen_objects"]) > 100_000  # torch's and Opacus's objects: the pause covered them
        await eventually(lambda: "mqtt.connected" in log.read_text(), timeout=60)
        assert proc.poll() is None
        # its threads carry names at the OS level (fedline.threadname): the main thread's is the process's
        comm = await asyncio.to_thread(Path(f"/proc/{proc.pid}/comm").read_text)
        assert comm.strip() == "fedline-edge"
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, bound(20))


async def test_a_backlog_replay_lets_the_agents_other_tasks_run_between_batches(tmp_path) -> None:
    """A historian backlog stored at full speed yields to the event loop after every batch it stores, so the
    agent's connection, grant, manifest and recovery answer proceed during the replay instead of after it
    (the first round then starts as soon as the backlog is in)."""
    from edge.agent import EdgeAgent
    from edge.config import load_edge_config
    from edge.ingest import BATCH_ROWS

    site, rows = "site-a", 5_000
    fed = Federation.create(tmp_path, [site])
    csv = write_csv(tmp_path / "rows.csv", rows)
    agent = EdgeAgent(load_edge_config(write_site(fed, site, csv, "mqtt://127.0.0.1:9", None, privacy="off")))
    ticks = 0

    async def other_task() -> None:  # stands for the connection's and the receive loop's steps
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_task())
    try:
        await asyncio.wait_for(agent.ingest.run(), bound(60))
    finally:
        ticker.cancel()
        agent.close()
    assert agent.sources_done and agent.new_rows == rows
    # at least one turn for the other task per stored batch (the CSV source alone yields every 256 rows, and
    # the queue between them switches every 1024: some 25 turns for these 5,000 rows)
    assert ticks >= rows // BATCH_ROWS - 2
