"""bench/e2e.py writes configs the real loaders accept, with the task the issue fixes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_configs_load_and_match_the_task(tmp_path):
    from aggregator.config import load_config
    from edge.config import load_edge_config
    from fedline.demo import workspace
    from fedline.demo.data import load_demo_data

    bench = _bench()
    data = load_demo_data(max_rows_per_site=300, derived=False)
    urls = {n: "mqtt://127.0.0.1:1" for n in ["aggregator", "L", "M", "H"]}
    paths = bench.write_configs(data, tmp_path, urls)
    agg = load_config(paths["aggregator"])
    assert agg.model.hidden == [32, 32] and agg.model.n_features == 5
    # the demo's strategy and publishing, so the bench measures what the demo runs (ONNX downloads included),
    # with the aggregator opening each update: what secure aggregation adds is bench/secagg.py's to measure
    demo = workspace.write_aggregator(
        workspace.Workspace(tmp_path / "demo", broker_url="mqtt://127.0.0.1:1"),
        data,
        workspace.Tuning(secure_aggregation=False),
    )
    assert agg.strategy == load_config(demo).strategy and agg.strategy.kind == "fedbuff"
    assert agg.publish.onnx is True
    for site in ("L", "M", "H"):
        cfg = load_edge_config(paths[site])
        assert cfg.training.epochs == 2 and cfg.dp is not None and cfg.model == agg.model
        assert cfg.training.on_new_model  # a round per global version, as in the demo
        rows = sum(1 for _ in (paths[site].parent / "history.csv").open()) - 1
        assert rows == len(data.site(site).train_rows)  # the chain trains on the plain loop's rows
    # the plain loop uses the very same training settings
    tcfg = bench.training_configs(data)
    assert {s: t.batch_size for s, t in tcfg.items()} == {
        s: load_edge_config(paths[s]).training.batch_size for s in ("L", "M", "H")
    }


def test_bench_quantise_option_configures_every_site_for_int8(tmp_path):
    from edge.config import load_edge_config
    from fedline.demo.data import load_demo_data

    bench = _bench()
    data = load_demo_data(max_rows_per_site=300, derived=False)
    urls = {n: "mqtt://127.0.0.1:1" for n in ["aggregator", "L", "M", "H"]}
    plain = bench.write_configs(data, tmp_path / "plain", urls)
    int8 = bench.write_configs(data, tmp_path / "int8", urls, "int8")
    for site in ("L", "M", "H"):
        assert load_edge_config(plain[site]).update.encoding == "float32"
        assert load_edge_config(int8[site]).update.encoding == "int8"
