"""Opacus's modules without Opacus's package ``__init__``: the edge imports the parts it uses, not every accountant.

Why: Python runs a package's ``__init__`` before any of its submodules, and ``opacus/__init__.py`` imports the
``PrivacyEngine`` and through it every accountant and optimizer. Its GDP accountant imports ``scipy.stats`` and
``scipy.optimize`` (and ``opacus/accountants/__init__.py`` imports that accountant too). Measured on the 2-vCPU
VM (1 Dec 2026, the machine loaded by other work, three fresh processes each): importing torch and the Opacus
modules an edge uses, and making its first optimizer, took 4.7-6.1 s of CPU through the package inits and 3.8-4.2 s
without them (BENCHMARKS.md, "Cheaper edge start-up"); the difference is an accountant fedline never uses: it
accounts with RDP (per record) or PRV (the legacy global budget, whose own imports load scipy.stats when it is
used), and trains with ``GradSampleModule`` and the Poisson sampler (the clipping, noise and step are
``edge.dpsgd``'s, computed as Opacus's ``DPOptimizer`` computes them).

How: :func:`defer_package_inits` registers the packages ``opacus`` and ``opacus.accountants`` in ``sys.modules``
from their real specs (their ``__path__``, ``__file__``) without running their ``__init__``. Importing a submodule
(``from opacus.optimizers.optimizer import DPOptimizer``) then runs only that submodule and what it imports. Each
deferred package finishes itself the first time anything asks it for a name it does not have yet (a module
``__getattr__``, PEP 562): its own ``__init__`` then runs in the same module object, so ``from opacus import
PrivacyEngine`` anywhere later in the process still works and gets the same classes as a plain import. Nothing of
Opacus's behaviour changes: the same modules run, the unused ones later or never. When Opacus is imported already
(a plain ``import opacus`` came first) this does nothing.

The one way in: fedline's code gets every Opacus module through :func:`opacus_module` (``opacus_module(
"accountants.rdp").RDPAccountant``), which defers the package inits and then imports the module. No other module
of fedline's packages imports ``opacus`` itself: the import-linter contract "Opacus only through
fedline.opacus_parts" (``.importlinter``, ``make check``) fails on a plain ``import opacus`` or ``from opacus...
import`` anywhere in them, so a new caller cannot forget the deferral and load every accountant again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

DEFERRED = ("opacus", "opacus.accountants")  # the packages whose ``__init__`` imports the GDP accountant

_lock = threading.RLock()
_pending: set[str] = set()  # registered here, their ``__init__`` not run yet


def defer_package_inits() -> None:
    """Register :data:`DEFERRED` without running their ``__init__`` (module docstring); idempotent, thread-safe.

    Call before importing a module of Opacus; a no-op when Opacus is imported already or not installed (the
    import that follows then fails as it would have)."""
    with _lock:
        for name in DEFERRED:
            if name in sys.modules:
                continue  # imported already (plainly, or deferred by an earlier call)
            spec = importlib.util.find_spec(name)  # the parent is in sys.modules by now: this imports nothing
            if spec is None or spec.loader is None or spec.submodule_search_locations is None:
                return
            module = importlib.util.module_from_spec(spec)
            module.__getattr__ = _finisher(module)  # type: ignore[method-assign]
            _pending.add(name)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)


def opacus_module(name: str) -> ModuleType:
    """Opacus's module ``opacus.<name>`` (``"accountants.rdp"``, ``"layers"``), imported without the package inits
    Opacus's other modules need not run (module docstring): the only way fedline's code imports Opacus."""
    defer_package_inits()
    return importlib.import_module(f"opacus.{name}")


def is_deferred(name: str) -> bool:
    """Whether package ``name`` is registered and its ``__init__`` has not run yet."""
    return name in _pending and name in sys.modules


def _finisher(module: ModuleType) -> Any:
    """The deferred package's ``__getattr__``: run its own ``__init__`` once, in place, then answer the lookup."""
    name = module.__name__

    def finish(attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__") and attr not in ("__all__", "__version__"):
            # dunder probes (copy, pickle, inspect, typing) ask for what a module need not have: no import for them
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        with _lock:
            if name in _pending:
                _pending.discard(name)
                del module.__dict__["__getattr__"]
                spec = module.__spec__
                assert spec is not None and spec.loader is not None
                spec.loader.exec_module(module)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    return finish


__all__ = ["DEFERRED", "defer_package_inits", "is_deferred", "opacus_module"]
