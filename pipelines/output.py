"""Where a command's result goes: stdout, kept clean for ``--json``.

A driver that joins a Ray cluster prints forwarded worker and raylet lines on ``sys.stdout``.
While a ``--json`` command runs, the real stdout is kept for the result alone and
``sys.stdout`` (what those lines are printed to) points at stderr, so ``... --json | jq`` and
a Ray Job's log parse as one JSON document.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

_result: TextIO | None = None


@contextlib.contextmanager
def stdout_for_result() -> Iterator[None]:
    """Within the block, ``print_result`` writes to stdout and every other print to stderr.

    A process whose stdout is the real one (the command line) stays that way after the block:
    Ray can still forward log lines while it shuts down at exit. A replaced stdout (a caller
    capturing output, as tests do) is put back."""
    global _result
    _result, saved = sys.stdout, sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        _result = None
        if saved is not sys.__stdout__:
            sys.stdout = saved


def print_result(text: str) -> None:
    print(text, file=_result or sys.stdout, flush=True)
