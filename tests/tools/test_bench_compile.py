"""fedline.testing.bench_trees.compile_tree: a bench compiles a checkout once, as ``pip install`` would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from fedline.testing.bench_trees import PACKAGES, compile_tree

ROOT = Path(__file__).resolve().parents[2]


def test_compile_tree_writes_bytecode_that_a_process_without_write_access_then_loads(tmp_path: Path) -> None:
    pkg = tmp_path / "edge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 41 + 1\n")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "other.py").write_text("X = 1\n")
    assert compile_tree(tmp_path) is True
    cached = pkg / "__pycache__" / Path(importlib.util.cache_from_source(str(pkg / "mod.py"))).name
    assert cached.is_file()
    assert not (tmp_path / "unrelated" / "__pycache__").exists()  # only the packages a bench starts
    # a process that may not write bytecode reads the compiled file (its source is gone: nothing else to read)
    (pkg / "mod.py").rename(pkg / "mod.py.bak")
    (pkg / "__pycache__" / cached.name).rename(pkg / "mod.pyc")
    out = subprocess.run(
        [sys.executable, "-B", "-c", "import edge.mod; print(edge.mod.VALUE)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"


def test_a_file_that_does_not_compile_is_reported(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.py").write_text("def f(:\n")
    assert compile_tree(tmp_path) is False


def test_the_packages_are_the_projects() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg
        assert f'"{pkg}*"' in text, f"{pkg} is not one of pyproject's packages"
