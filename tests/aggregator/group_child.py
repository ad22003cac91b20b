"""Child process for the group-commit kill -9 test: decides sealed updates in groups of two, one commit each.

After deciding a group and *before* its commit it prints ``{"decided": n}`` and, for the group
numbered ``pause`` (1-based), waits for a line on stdin: the parent kills it there, between the
decisions and their commit. Receipts are printed only after their group committed.
Usage: python -m tests.aggregator.group_child <aggregator.toml> <blob dir> <pause>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aggregator.config import load_config
from aggregator.core import AggregatorCore


def main() -> None:
    cfg = load_config(sys.argv[1])
    pause = int(sys.argv[3])
    core = AggregatorCore(cfg)
    blobs = [p.read_bytes() for p in sorted(Path(sys.argv[2]).glob("*.bin"))]
    for number, at in enumerate(range(0, len(blobs), 2), start=1):
        with core.store.grouped():
            decisions = [core.decide(core.open(b)) for b in blobs[at : at + 2]]
            print(json.dumps({"decided": len(decisions), "group": number}), flush=True)
            if number == pause:
                sys.stdin.readline()
        for d in decisions:
            for r in d.receipts:
                print(json.dumps(r), flush=True)
    core.close()


if __name__ == "__main__":
    main()
