"""The function-length guardrail (tools/function_length.py, run by `make check`) catches what it must.

Each test writes a small module with a function of a known length (counted by hand: the `def` line, the
body lines, nothing before the `def`) and runs the real script on it: once as a process, as `make check` does,
the other times its `main` in this process (the same code, without a Python start-up per case).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "function_length.py"


def _module_with(tmp_path: Path, body_lines: int, name: str = "long_one", decorated: bool = False) -> Path:
    """A module whose one method is 1 (the def) + body_lines lines long, inside a class, after 3 other lines."""
    lines = ['"""A module."""', "", "class Holder:"]
    if decorated:
        lines.append("    @staticmethod")
    lines.append(f"    def {name}():")
    lines += [f"        x{i} = {i}" for i in range(body_lines)]
    path = tmp_path / "mod.py"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _load_script() -> Any:
    """tools/ is not a package: load the script by its path (registered, as its dataclasses need)."""
    if "fedline_tools_function_length" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fedline_tools_function_length", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["fedline_tools_function_length"]


class _Result:
    def __init__(self, returncode: int, stdout: str) -> None:
        self.returncode, self.stdout = returncode, stdout


def _run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> _Result:
    """The script's main in this process, with its exit code and what it printed."""
    returncode = _load_script().main([str(a) for a in args])
    return _Result(returncode, capsys.readouterr().out)


def test_a_61_line_method_fails_the_script_naming_file_line_and_length(tmp_path: Path) -> None:
    path = _module_with(tmp_path, body_lines=60)  # def + 60 = 61 lines, starting on line 4
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stdout.strip() == f"{path.as_posix()}:4: Holder.long_one is 61 lines (max 60)"


def test_a_60_line_method_passes_and_decorators_do_not_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _module_with(tmp_path, body_lines=59, decorated=True)  # decorator + def + 59: the function is 60
    result = _run(capsys, path)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""


def test_a_folder_is_searched_and_a_nested_function_is_named_by_its_parents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    inner = "\n".join(f"        y{i} = {i}" for i in range(10))
    (package / "m.py").write_text(f"def outer():\n    def inner():\n{inner}\n    return inner\n", encoding="utf-8")
    # outer is 13 lines (def, def inner, 10 body lines, return), inner is 11.
    result = _run(capsys, "--max", "10", tmp_path / "pkg")
    assert result.returncode == 1
    found = result.stdout.splitlines()
    m = (package / "m.py").as_posix()
    assert found == [f"{m}:1: outer is 13 lines (max 10)", f"{m}:2: outer.inner is 11 lines (max 10)"]


def test_the_allow_list_excuses_a_listed_function_and_refuses_a_stale_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _module_with(tmp_path, body_lines=60)
    allow = tmp_path / "allow"
    allow.write_text(f"# not yet split\n{path.as_posix()}::Holder.long_one\n", encoding="utf-8")
    assert _run(capsys, "--allow", allow, path).returncode == 0

    allow.write_text(f"{path.as_posix()}::Holder.long_one\n{path.as_posix()}::Holder.gone\n", encoding="utf-8")
    result = _run(capsys, "--allow", allow, path)
    assert result.returncode == 1
    assert f"{path.as_posix()}::Holder.gone: on the allow-list but not over 60 lines" in result.stdout
