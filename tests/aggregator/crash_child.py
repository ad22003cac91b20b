"""Child process for the kill -9 tests: feed sealed updates from a folder to an AggregatorCore.

Prints one JSON receipt per line (flushed), so the parent can kill it at a
chosen point. Usage: python -m tests.aggregator.crash_child <aggregator.toml> <blob dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aggregator.config import load_config
from aggregator.core import AggregatorCore


def main() -> None:
    cfg = load_config(sys.argv[1])
    core = AggregatorCore(cfg)
    print(json.dumps({"ready": core.version, "buffered": len(core.buffer)}), flush=True)
    for path in sorted(Path(sys.argv[2]).glob("*.bin")):
        d = core.process(path.read_bytes())
        print(json.dumps(d.receipt), flush=True)
    core.close()


if __name__ == "__main__":
    main()
