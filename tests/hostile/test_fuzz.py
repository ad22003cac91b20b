"""Every decoder under coverage-guided fuzzing (atheris/libFuzzer) for a fixed budget.

Each harness in ``fuzz/`` is run in its own process, as a user would run it
(``python fuzz/fuzz_<x>.py -runs=N``), with a fixed libFuzzer seed so a run is
reproducible, a per-input timeout (a hang is a failure) and an RSS limit (an
unbounded allocation is a failure). A harness exits non-zero on any exception
other than the library's own errors; the test then shows the traceback and the
saved crash input. Longer budgets: ``make fuzz`` (see RELIABILITY.md), or
``pytest -m slow tests/hostile/test_fuzz.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HARNESSES = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))
RUNS = 4000
SLOW_RUNS = 200_000


class KnownFinding(AssertionError):
    """The harness crashed with a bug already reported (and only that bug)."""


#: harnesses that currently find a bug in code this suite does not own: (what, a string of its traceback).
#: The xfail is strict and only for that traceback, so the marker must go when the bug is fixed, and any
#: other crash still fails (see RELIABILITY.md).
KNOWN_FINDINGS: dict[str, tuple[str, str]] = {}  # harness -> (open bug, its traceback text); none open


# libFuzzer's -rss_limit_mb reads the process's peak RSS (ru_maxrss), and Linux carries that peak over from the
# parent through vfork/fork and exec: started from a pytest worker that has grown past 1 GB, every harness
# "ran out of memory" at its first inputs whatever it did. A fork from this small launcher starts the count
# afresh (a new process's peak is its own), so the limit measures the harness alone.
_FRESH_PEAK = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_harness(name: str, runs: int, tmp_path: Path, seed: int = 1) -> subprocess.CompletedProcess[str]:
    # TMPDIR: the seed corpus lands in the test's own folder; FUZZ_SCRATCH: files written on
    # every input go to RAM when there is a /dev/shm (removed afterwards)
    scratch = Path(tempfile.mkdtemp(prefix="fedline-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    env = dict(os.environ, FUZZ_ARTIFACTS=str(tmp_path / "artifacts"), TMPDIR=str(tmp_path), FUZZ_SCRATCH=str(scratch))
    try:
        return subprocess.run(
            [
                sys.executable,
                "-c",
                _FRESH_PEAK,
                sys.executable,
                str(FUZZ / f"{name}.py"),
                f"-runs={runs}",
                f"-seed={seed}",
                "-rss_limit_mb=1024",
                "-timeout=10",
                "-print_final_stats=1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check(name: str, proc: subprocess.CompletedProcess[str], runs: int) -> None:
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and name in KNOWN_FINDINGS and KNOWN_FINDINGS[name][1] in out:
        raise KnownFinding(f"{name}: {KNOWN_FINDINGS[name][0]}")
    assert proc.returncode == 0, f"{name} found a crash (exit {proc.returncode}):\n{out[-4000:]}"
    done = re.search(r"Done (\d+) runs", out)
    assert done and int(done.group(1)) == runs, f"{name} did not complete {runs} runs:\n{out[-2000:]}"


def _params(runs_marks: list) -> list:
    out = []
    for name in HARNESSES:
        marks = list(runs_marks)
        if name in KNOWN_FINDINGS:
            marks.append(pytest.mark.xfail(strict=True, raises=KnownFinding, reason=KNOWN_FINDINGS[name][0]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_every_decoder_has_a_harness() -> None:
    expected = {
        "fuzz_open_update",
        "fuzz_decode_tensors",
        "fuzz_manifest",
        "fuzz_receipt",
        "fuzz_chunks",
        "fuzz_topics",
        "fuzz_sparkplug",
        "fuzz_site_config",
        "fuzz_key_files",
        "fuzz_sealed_docs",
        "fuzz_update_header",
        "fuzz_status",
    }
    assert expected <= set(HARNESSES)


@pytest.mark.parametrize("name", _params([]))
def test_harness_survives_budget(name: str, tmp_path: Path) -> None:
    proc = run_harness(name, RUNS, tmp_path)
    check(name, proc, RUNS)
    assert not list((tmp_path / "artifacts").glob("crash-*")), "crash input written"


@pytest.mark.parametrize("name", _params([pytest.mark.slow, pytest.mark.timeout(1800)]))
def test_harness_survives_long_budget(name: str, tmp_path: Path) -> None:
    proc = run_harness(name, SLOW_RUNS, tmp_path, seed=7)
    check(name, proc, SLOW_RUNS)


def test_harness_reports_a_foreign_exception(tmp_path: Path) -> None:
    """The harness itself must fail on an exception that is not the library's own,
    or a green fuzz run would prove nothing."""
    script = tmp_path / "fuzz_broken.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(FUZZ)!r})\n"
        "from _harness import main\n"
        "def target(data):\n"
        "    if data[:1] == b'!':\n"
        "        raise KeyError('not a library error')\n"
        "main(target, [b'!boom'])\n"
    )
    # TMPDIR: the harness's seed corpus lands in the test's own folder, not in /tmp for good
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(script), "-runs=50", "-seed=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "KeyError: 'not a library error'" in proc.stdout + proc.stderr
    assert list(tmp_path.glob("crash-*")), "the crashing input is saved for reproduction"


def test_the_rss_limit_measures_the_harness_not_the_process_that_started_it(tmp_path: Path) -> None:
    """From a parent whose peak RSS is past the 1 GB limit (a long-running pytest worker), a harness still
    starts at its own size (about 65 MB), not the parent's."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
big = bytearray(1100 * 2**20)  # 1.1 GB, touched: resident
big[:: 4096] = b"x" * len(big[:: 4096])
from tests.hostile.test_fuzz import run_harness
proc = run_harness("fuzz_chunks", 50, Path({str(tmp_path)!r}))
print(json.dumps({{"rc": proc.returncode, "out": proc.stdout + proc.stderr}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0, got["out"][-2000:]
    peaks = [int(m) for m in re.findall(r"INITED .* rss: (\d+)Mb", got["out"])]
    assert peaks and peaks[0] < 512, got["out"][-2000:]
