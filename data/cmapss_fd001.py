"""Make ``data/cmapss_fd001.csv`` from NASA's ``train_FD001.txt`` (run once; the product never imports this).

What it does, and nothing more: adds a header, the label ``RUL`` (remaining
useful life: the unit's last cycle minus this cycle, capped at 125 cycles as
is usual for this data) and a ``plant`` column that assigns the 100 engines to
four plants of unequal size (engines 1-45, 46-75, 76-94, 95-100: 45, 30, 19
and 6 engines), so the file runs through ``fedline demo``'s bring-your-own-CSV
path like any user's data (``make demo-cmapss``).

Usage: python data/cmapss_fd001.py PATH/train_FD001.txt > data/cmapss_fd001.csv
"""

from __future__ import annotations

import csv
import sys

CAP = 125
PLANTS = [(45, "north"), (75, "east"), (94, "south"), (100, "west")]  # last engine of each plant
COLUMNS = ["unit", "cycle", "setting1", "setting2", "setting3", *(f"s{i}" for i in range(1, 22))]


def main(path: str) -> None:
    rows = [line.split() for line in open(path, encoding="ascii") if line.strip()]
    last: dict[int, int] = {}
    for r in rows:
        last[int(r[0])] = max(last.get(int(r[0]), 0), int(r[1]))
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["plant", *COLUMNS, "RUL"])
    for r in rows:
        unit, cycle = int(r[0]), int(r[1])
        plant = next(name for end, name in PLANTS if unit <= end)
        out.writerow([plant, *r, min(CAP, last[unit] - cycle)])


if __name__ == "__main__":
    main(sys.argv[1])
