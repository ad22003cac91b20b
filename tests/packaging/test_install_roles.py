"""Installs per role: a line PC gets ONNX Runtime and no torch; `fedline infer` runs without it.

The resolution test asks pip what `pip install '.[line]'` would install (the
same resolver, the same indexes, nothing installed); the run test starts
`fedline infer --help` in a process where importing torch or opacus fails, as
on a line PC that never installed them. The slow test does the real thing in a
fresh virtual environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "opacus", "matplotlib", "scipy", "amqtt", "psutil"}

_BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'opacus'):
            raise ImportError(f'{name} is not installed on a line PC')
        return None
sys.meta_path.insert(0, _NoTorch())
sys.argv = ['fedline', *sys.argv[1:]]
from fedline.cli import main
sys.exit(main())
"""


def _names(report: dict) -> set[str]:
    return {item["metadata"]["name"].lower().replace("_", "-") for item in report["install"]}


def test_line_extra_resolves_to_onnxruntime_without_torch(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(out),
            f"{ROOT}[line]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    names = _names(json.loads(out.read_text()))
    assert "onnxruntime" in names and "aiomqtt" in names and "pynacl" in names
    assert not names & HEAVY, f"a line install would pull {sorted(names & HEAVY)}"
    assert not any(n.startswith("nvidia-") for n in names)


def test_edge_extra_brings_torch_and_opacus(tmp_path: Path) -> None:
    """The resolution test above can fail: the edge's extra does pull torch (the same resolver says so)."""
    out = tmp_path / "report.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--no-deps",
            "--report",
            str(out),
            f"{ROOT}[edge]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    requires = " ".join(report["install"][0]["metadata"].get("requires_dist", []))
    assert 'torch==2.13.0; extra == "edge"' in requires and "opacus" in requires


def test_fedline_infer_help_runs_without_torch() -> None:
    res = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, "infer", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--config" in res.stdout
    # and the guard bites: the edge agent does need torch
    res = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH.replace("sys.exit(main())", "import edge.trainer"), "edge"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode != 0 and "not installed on a line PC" in res.stderr


@pytest.mark.slow
def test_line_install_in_a_fresh_venv(tmp_path: Path) -> None:
    """The real install, from the package indexes: no torch in site-packages, and `fedline infer --help` runs."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[line]"], capture_output=True, text=True, timeout=1200
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list((env_dir / "lib").glob("python3*/site-packages/torch"))
    res = subprocess.run(
        [str(env_dir / "bin" / "fedline"), "infer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "--config" in res.stdout, res.stderr[-2000:]


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Dockerfile instructions by stage name (continuation lines joined)."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            current = stages.setdefault(words[3] if len(words) >= 4 and words[2].upper() == "AS" else words[1], [])
        current.append(line)
    return stages


def test_dockerfile_line_target_installs_no_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = _stages(text)
    assert list(stages) == ["base", "line", "full"]  # the last stage is `docker build`'s default target
    line = " ".join(stages["line"])
    assert '".[line]"' in line and "torch" not in line and stages["line"][0] == "FROM base AS line"
    full = " ".join(stages["full"])
    assert "torch==2.13.0" in full and ".[edge,aggregator,line]" in full
    assert all(
        "-c requirements.lock" in r for r in stages["line"] + stages["full"] if r.startswith("RUN pip install .")
    )
    for copy in (r for r in stages["base"] if r.startswith("COPY ")):
        for src in copy.split()[1:-1]:
            assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "requirements.lock" not in ignored
