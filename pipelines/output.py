"""Where a command's result goes: stdout, kept clean for ``--json``.

A driver that joins a Ray cluster prints forwarded worker and raylet lines on ``sys.stdout``.
While a ``--json`` command runs, the real stdout is kept for the result alone and
``sys.stdout`` (what those lines are printed to) points at stderr, so ``... --json | jq`` and
a Ray Job's log parse as one JSON document.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

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


def print_report(result: dict[str, Any], as_json: bool) -> None:
    """A benchmark's result: the JSON document (``--json``), or the same numbers as text (one
    ``name value`` line per number, nested sections as dotted names, lists of records as
    tables)."""
    print_result(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


def report_lines(result: dict[str, Any], prefix: str = "") -> list[str]:
    lines: list[str] = []
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            lines += report_lines(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += [f"{name}:"] + _table(value)
        else:
            lines.append(f"{name:36s} {_text(value)}")
    return lines


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = [k for k in dict.fromkeys(k for r in rows for k in r) if all(not isinstance(r.get(k), (dict, list))
                                                                          for r in rows)]
    cells = [[_text(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths))] + [
        "  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]


def quiet_libraries() -> None:
    """Silence third-party progress bars and advice that would bury our own output.

    diffusers, transformers and the hub read these settings from the environment when they are
    imported, so a command that stops before loading a model (a config error) does not pay for
    importing them; a library already imported in this process is told directly."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
