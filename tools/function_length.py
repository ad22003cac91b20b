"""Fail when a function in the service packages is longer than the limit (issue 17: no function over 60 lines).

Why a script and not a ruff rule: ruff's PLR0915 counts statements, not lines, so a 200-line function made of a
few long `async with` blocks passes it; what makes a function hard to read is how far you must scroll. This
counts the lines from the `def` (decorators excluded) to the function's last line, docstring and comments
included, for every function and method, nested ones too (a nested function's lines also count for its parent).

Usage: `python tools/function_length.py [--max 60] [--allow FILE] PATH...` (PATHs are files or folders).
Prints `file:line: name is N lines (max M)` for each one over, and exits 1 if there is any. The allow-list file
(one `file::qualified.name` a line, `#` comments) names functions not yet split; an entry that is no longer
over the limit, or no longer exists, is itself an error, so the list can only shrink.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX = 60


@dataclass(frozen=True)
class Function:
    """One function definition: where it starts, its dotted name inside the module and its length in lines."""

    path: str
    line: int
    name: str
    length: int

    @property
    def key(self) -> str:
        """The allow-list spelling: `file::Class.method`."""
        return f"{self.path}::{self.name}"


def functions(path: Path, shown_as: str) -> Iterator[Function]:
    """Every function and method in one file, nested ones included, with its qualified name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                end = child.end_lineno if child.end_lineno is not None else child.lineno
                yield Function(shown_as, child.lineno, name, end - child.lineno + 1)
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def python_files(paths: list[str]) -> Iterator[Path]:
    """The .py files under each path, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if p.is_file())
        else:
            yield path


def read_allow_list(path: Path | None) -> set[str]:
    """The `file::name` entries of the allow-list (blank lines and `#` comments ignored)."""
    if path is None:
        return set()
    entries = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {entry for entry in entries if entry}


def problems(paths: list[str], limit: int, allowed: set[str]) -> list[str]:
    """One message per function over the limit that is not allowed, and per allow-list entry that is stale."""
    messages: list[str] = []
    seen_over: set[str] = set()
    for path in python_files(paths):
        for fn in functions(path, path.as_posix()):
            if fn.length <= limit:
                continue
            seen_over.add(fn.key)
            if fn.key not in allowed:
                messages.append(f"{fn.path}:{fn.line}: {fn.name} is {fn.length} lines (max {limit})")
    for stale in sorted(allowed - seen_over):
        messages.append(f"{stale}: on the allow-list but not over {limit} lines (or gone): remove it from the list")
    return messages


def main(argv: list[str] | None = None) -> int:
    """Check the paths; print each problem; exit 1 if there is any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="files or folders to check")
    parser.add_argument("--max", type=int, default=DEFAULT_MAX, help="longest allowed function, in lines")
    parser.add_argument("--allow", type=Path, default=None, help="allow-list of functions not yet split")
    args = parser.parse_args(argv)
    found = problems(args.paths, args.max, read_allow_list(args.allow))
    for message in found:
        print(message)
    if found:
        print(f"function_length: {len(found)} problem(s); split long functions by responsibility", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
