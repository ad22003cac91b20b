"""What the benches under ``bench/`` share: loading another bench script, byte-compiling and naming the checkouts
they compare, and printing their report.

Why here: the bench scripts cannot import one another by name (``bench/aggregator.py`` and ``bench/edge.py`` would
shadow the ``aggregator`` and ``edge`` packages, so each script takes ``bench/`` off ``sys.path``), and the
start-up benches compare checkouts (``--tree``) the same way; one home keeps the label and the report alike.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def load_script(path: Path, name: str) -> ModuleType:
    """Load a bench script as module ``name`` (registered in ``sys.modules``: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the bench script {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


PACKAGES = ("fedline", "edge", "aggregator", "plant", "firmware_adapters", "broker_bridge", "models")


def compile_tree(tree: Path) -> bool:
    """Byte-compile a checkout's packages into their ``__pycache__``, as ``pip install`` does for an installed copy.

    Why: a source checkout installed in editable mode has no bytecode of its own, and where
    ``PYTHONDONTWRITEBYTECODE`` is set (these machines set it) every process that starts compiles each module it
    imports again: 0.1-0.25 s of CPU per process, which no installed deployment (wheel, Docker image) pays. A bench
    that starts processes compiles once first. Returns False when a file did not compile.
    """
    return all(compileall.compile_dir(tree / pkg, quiet=1) for pkg in PACKAGES if (tree / pkg).is_dir())


def tree_label(tree: Path) -> str:
    """A checkout's short commit, with ``+`` when it has uncommitted changes; its path when it is not a git tree."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True)
        return head + ("+" if dirty.stdout.strip() else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return str(tree)


def print_report(doc: dict[str, Any], as_json: bool) -> None:
    """One JSON object with ``--json``; otherwise the summary, readable, and the load average around the run."""
    if as_json:
        print(json.dumps(doc))
    else:
        print(json.dumps(doc["summary"], indent=1))
        print(f"load average {doc['load_average'][0]} -> {doc['load_average'][1]}")
