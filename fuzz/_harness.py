"""What every fedline fuzz harness shares: fixed keys, the accepted errors, and the runner.

Why a runner of our own around ``atheris.Setup``/``atheris.Fuzz``: each harness
needs the same three things, and writing them once keeps the harnesses short:

- **Accepted errors.** A decoder may refuse input only with the library's own
  errors (``FedlineError`` subclasses, ``ConfigError``, and the adapters'
  documented error type). Anything else (``KeyError``, ``RecursionError``, a
  bare ``ValueError``...) propagates, and libFuzzer reports it as a crash with
  the input saved as ``crash-<sha1>`` (in ``$FUZZ_ARTIFACTS`` if set).
- **Seed corpus.** Random bytes rarely get past a magic number, so every
  harness gives a few valid inputs; they are written to a fresh corpus folder
  unless a corpus folder is passed on the command line (``make fuzz`` keeps one
  in ``fuzz/corpus/<harness>`` so long runs build on each other).
- **Resource limits.** ``-rss_limit_mb`` (default 1024 here) makes unbounded
  memory a crash, ``-timeout`` (default 10 s per input) makes a hang one.

Keys are derived from fixed seeds, so a crash input found once reproduces on
any machine (the sealed box itself is randomised, but it opens with the same
aggregator key).
"""

from __future__ import annotations

# Heavy, well-fuzzed dependencies are imported before instrumentation, so the
# coverage map (and the time budget) is spent on fedline's own code.
import json  # noqa: F401
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris
import nacl.public
import nacl.signing  # noqa: F401
import numpy  # noqa: F401

#: fedline's packages: what gets coverage instrumentation when a harness imports it
INCLUDE = ["broker_bridge", "fedline", "firmware_adapters", "edge", "models"]


def instrumented():
    """``with instrumented(): import ...`` gives fedline modules imported in the block coverage feedback."""
    return atheris.instrument_imports(include=INCLUDE)


with instrumented():
    from broker_bridge.errors import FedlineError
    from broker_bridge.keys import Enrollment, KeyPair
    from fedline.config import ConfigError

FEDERATION = "fuzz"

#: errors a decoder may raise on bad input; harnesses may add their own documented type
ACCEPTED: tuple[type[BaseException], ...] = (FedlineError, ConfigError)


def fixed_keypair(role: str, ident: str, seed: int) -> KeyPair:
    """A key pair derived from ``seed``: reproducible across runs and machines."""
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    return KeyPair(ident, role, SigningKey(bytes([seed]) * 32), PrivateKey(bytes([seed + 100]) * 32))


AGGREGATOR = fixed_keypair("aggregator", "aggregator", 1)
SITE_A = fixed_keypair("site", "site-a", 2)
SITE_B = fixed_keypair("site", "site-b", 3)
OUTSIDER = fixed_keypair("site", "site-x", 4)  # has keys, is not enrolled


def enrollment() -> Enrollment:
    enr = Enrollment(FEDERATION, AGGREGATOR.public())
    enr.add(SITE_A.public())
    enr.add(SITE_B.public())
    return enr


def scratch_dir(prefix: str) -> Path:
    """A folder for files a harness writes on every input (key files, site.toml).

    ``$FUZZ_SCRATCH`` if set (the tests point it at a folder in /dev/shm and
    remove it after: on a container's overlay disk each write+read costs
    milliseconds, in RAM microseconds), else a new temporary folder.
    """
    base = os.environ.get("FUZZ_SCRATCH")
    if base:
        path = Path(base) / prefix
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"fedline-fuzz-{prefix}-"))


def guarded(
    target: Callable[[bytes], None], accepted: tuple[type[BaseException], ...] = ACCEPTED
) -> Callable[[bytes], None]:
    """``target`` with the accepted errors swallowed; any other exception escapes (a crash)."""

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except accepted:
            pass

    return one_input


def _has_corpus(args: list[str]) -> bool:
    return any(not a.startswith("-") and Path(a).is_dir() for a in args[1:])


def main(
    target: Callable[[bytes], None], seeds: Iterable[bytes], accepted: tuple[type[BaseException], ...] = ACCEPTED
) -> None:
    """Run ``target`` under libFuzzer with ``sys.argv`` flags, seeded with ``seeds``.

    Plain ``python fuzz/x.py -runs=5000`` works with no other arguments.
    """
    argv = list(sys.argv)
    if not any(a.startswith("-rss_limit_mb=") for a in argv):
        argv.append("-rss_limit_mb=1024")
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=10")
    artifacts = os.environ.get("FUZZ_ARTIFACTS")
    if artifacts and not any(a.startswith("-artifact_prefix=") for a in argv):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        argv.append(f"-artifact_prefix={artifacts.rstrip('/')}/")
    if not _has_corpus(argv):
        corpus = Path(tempfile.mkdtemp(prefix=f"fedline-fuzz-{Path(argv[0]).stem}-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
        argv.append(str(corpus))
    else:  # a kept corpus: add the seeds to it so it never starts empty
        folder = next(Path(a) for a in argv[1:] if not a.startswith("-") and Path(a).is_dir())
        for i, seed in enumerate(seeds):
            path = folder / f"seed-{i:03d}"
            if not path.exists():
                path.write_bytes(seed)
    logging.disable(logging.CRITICAL)  # refusals are logged by design; millions of lines would be the bottleneck
    atheris.Setup(argv, guarded(target, accepted))
    atheris.Fuzz()
