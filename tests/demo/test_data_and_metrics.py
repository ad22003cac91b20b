"""The demo's data split and its metrics, on the bundled AI4I file and on made-up CSVs."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from fedline.demo.data import DemoDataError, ai4i_plc_map, hash_bucket, load_demo_data, site_id_for
from models.metrics import better, rmse, roc_auc


def test_ai4i_sites_are_the_product_types_with_their_row_and_failure_counts():
    d = load_demo_data()
    got = {s.site: (s.rows, s.positives) for s in d.sites}
    assert got == {"L": (6000, 235), "M": (2997, 83), "H": (1003, 21)}
    assert [s.site for s in d.sites] == ["L", "M", "H"]  # biggest first
    assert d.task == "classification" and d.metric == "roc_auc"
    assert not d.ranges_from_data  # engineering ranges from the register map


def test_split_sites_cuts_a_site_into_plants_of_consecutive_rows():
    whole = load_demo_data()
    d = load_demo_data(split_sites={"L": 2})
    assert [s.site for s in d.sites] == ["L1", "L2", "M", "H"]  # four sites: three keep publishing while one is away
    l1, l2 = d.site("L1"), d.site("L2")
    assert (l1.rows, l2.rows) == (3000, 3000) and l1.positives + l2.positives == 235
    udi = lambda s: {int(r["UDI"]) for r in s.train_rows + s.test_rows}
    assert max(udi(l1)) < min(udi(l2))  # consecutive rows in file order, no row in both
    assert udi(l1) | udi(l2) == udi(whole.site("L"))
    assert l1.key == "L (plant 1 of 2)"
    with pytest.raises(DemoDataError, match="Q is not a site"):
        load_demo_data(split_sites={"Q": 2})


def test_split_is_80_20_stratified_and_fixed_by_the_seed():
    a, b = load_demo_data(), load_demo_data()
    for sa, sb in zip(a.sites, b.sites):
        assert len(sa.test_rows) == pytest.approx(0.2 * sa.rows, abs=2)
        # stratified: the share of failures is the same in both parts (within one row)
        assert abs(sa.y_test.sum() - 0.2 * sa.positives) <= 1
        assert [r["UDI"] for r in sa.test_rows] == [r["UDI"] for r in sb.test_rows]
        assert not {r["UDI"] for r in sa.test_rows} & {r["UDI"] for r in sa.train_rows}
    c = load_demo_data(seed=1)
    assert [r["UDI"] for r in c.sites[0].test_rows] != [r["UDI"] for r in a.sites[0].test_rows]


def test_derived_plc_quantities_are_columns_features_and_registers():
    d = load_demo_data(derived=True)
    assert d.features[5:] == ["Power [W]", "Temperature difference [K]", "Tool strain [Nm min]"]
    row = d.sites[0].train_rows[0]  # written to the site CSVs the PLC simulator serves
    speed, torque, wear = (float(row[c]) for c in ("Rotational speed [rpm]", "Torque [Nm]", "Tool wear [min]"))
    assert float(row["Power [W]"]) == pytest.approx(torque * speed * 2 * np.pi / 60, abs=0.01)
    assert float(row["Tool strain [Nm min]"]) == pytest.approx(torque * wear, abs=0.01)
    assert d.sites[0].x_train[0, 7] == pytest.approx(torque * wear, abs=0.01)
    tags = ai4i_plc_map()["tags"]
    holding = sorted(
        (t["address"], t["address"] + (1 if t["type"] == "uint16" else 2)) for t in tags if t["table"] == "holding"
    )
    assert all(a_end <= b for (_, a_end), (b, _) in itertools.pairwise(holding))  # no overlapping registers
    assert next(t["range"] for t in tags if t["name"] == "Power [W]") == [0.0, 15000.0]
    assert load_demo_data().features == d.features[:5]  # the default: the five measured values


def test_normalise_matches_the_register_map_ranges_and_clips():
    d = load_demo_data()
    x = np.array([[295.0, 315.0, 2000.0, 40.0, 520.0]])
    assert d.normalise(x)[0].tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5, 1.0])


def _write(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_bring_your_own_regression_csv_one_site_per_value(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[f"plant {i % 3}", float(a), float(b), 2 * a - b] for i, (a, b) in enumerate(rng.normal(size=(90, 2)))]
    p = _write(tmp_path / "r.csv", ["where", "a", "b", "y"], rows)
    d = load_demo_data(p, site_column="where", label="y")
    assert d.task == "regression" and d.metric == "rmse"
    assert d.features == ["a", "b"]  # every other numeric column
    assert sorted(s.site for s in d.sites) == ["plant-0", "plant-1", "plant-2"]
    assert d.ranges_from_data and d.label_range is not None
    y = d.sites[0].y_train
    assert d.untarget(d.target(y)) == pytest.approx(y, abs=1e-5)  # float32 target


def test_sites_n_splits_by_a_stable_hash(tmp_path):
    rows = [[f"m{i}", i, i % 2] for i in range(200)]
    p = _write(tmp_path / "c.csv", ["machine", "x", "fail"], rows)
    d = load_demo_data(p, site_column="machine", label="fail", n_sites=3)
    assert sorted(s.site for s in d.sites) == ["site-0", "site-1", "site-2"]
    assert sum(s.rows for s in d.sites) == 200
    for s in d.sites:
        for r in s.train_rows + s.test_rows:
            assert s.site == f"site-{hash_bucket(r['machine'], 3)}"
    assert hash_bucket("m1", 3) == hash_bucket("m1", 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site_column": "nope", "label": "fail"}, "site column 'nope' is not a column"),
        ({"site_column": "machine", "label": "nope"}, "label 'nope' is not a column"),
        ({"site_column": "machine", "label": "fail", "features": ["x", "zz"]}, "feature column(s) 'zz' not found"),
        ({"site_column": "machine", "label": "x", "task": "classification"}, "must be 0 or 1 for classification"),
        ({"site_column": "one", "label": "fail"}, "has only one value"),
    ],
)
def test_bad_choices_are_named(tmp_path, kwargs, message):
    rows = [[f"m{i % 2}", "same", i, i % 2] for i in range(20)]
    p = _write(tmp_path / "c.csv", ["machine", "one", "x", "fail"], rows)
    with pytest.raises(DemoDataError) as e:
        load_demo_data(p, **kwargs)
    assert message in str(e.value)


def test_a_non_number_names_file_line_and_column(tmp_path):
    p = _write(tmp_path / "c.csv", ["s", "x", "y"], [["a", 1, 0], ["b", "oops", 1]])
    with pytest.raises(DemoDataError, match=r"line 3: column 'x' holds 'oops'"):
        load_demo_data(p, site_column="s", label="y", features=["x"])


def test_site_ids_are_made_safe():
    assert site_id_for("Press #3/left") == "Press--3-left"
    assert site_id_for("_x") == "site-_x"


def test_roc_auc_known_values():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    # one of four positive/negative pairs is misordered
    assert roc_auc(y, np.array([0.1, 0.35, 0.3, 0.9])) == 0.75
    assert np.isnan(roc_auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_rmse_and_better():
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx((4 / 3) ** 0.5)
    assert better("roc_auc", 0.9, 0.8) and not better("roc_auc", 0.8, 0.9)
    assert better("rmse", 0.1, 0.2) and not better("rmse", 0.2, 0.1)
