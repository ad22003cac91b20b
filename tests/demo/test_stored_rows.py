"""The report says how many rows each agent actually held (issue 16: "the report says exactly which rows came from
where"): the PLC serves its live rows on its own clock, so rows it served before the agent first polled it never
reach the agent (docs/tuning.md, seventeenth pass: C-MAPSS east held 3,071 of its 3,194 training rows)."""

from __future__ import annotations

import numpy as np

from edge.dataset import Dataset
from fedline.demo.data import load_demo_data
from fedline.demo.notes import provenance
from fedline.demo.runner import stored_rows
from fedline.demo.workspace import Tuning


def test_stored_rows_reads_an_agents_training_and_validation_rows_worked_by_hand(tmp_path):
    # random split at 0.5: row id i is held out when (i * 2654435761 mod 2^32) / 2^32 < 0.5. By hand for ids 1-6:
    # 0.618, 0.236, 0.854, 0.472, 0.090, 0.708: ids 2, 4 and 5 are validation rows, 1, 3 and 6 training rows
    ds = Dataset(tmp_path / "state" / "dataset.sqlite", (2,), 1, max_rows=100, holdout_fraction=0.5)
    ds.add_many([(np.zeros(2, np.float32), np.zeros(1, np.float32)) for _ in range(6)])
    ds.close()
    assert stored_rows(tmp_path / "state") == (3, 3)
    assert stored_rows(tmp_path / "nowhere") is None  # a site whose agent never stored a row: nothing to say


def test_the_provenance_says_when_an_agent_held_fewer_rows_than_it_was_sent():
    data = load_demo_data(split_sites={"L": 2})
    h = data.site("H")
    held = int(data.validation_mask(h).sum())
    sent = len(h.train_rows)
    full = provenance(data, Tuning(), {"H": (sent - held, held)})
    short = provenance(data, Tuning(), {"H": (sent - held - 40, held)})
    line = next(n for n in short if n.startswith("Site H "))
    assert "held only" not in next(n for n in full if n.startswith("Site H "))
    assert f"held only {sent - 40} of them at the end (40 fewer" in line
    assert f"{sent - held - 40} training and {held} validation rows" in line
    assert f"train on all {sent - held}." in line
    # the sites the counts do not name are described as before
    assert [n for n in short if not n.startswith("Site H ")] == [n for n in full if not n.startswith("Site H ")]
