"""The user's errors, found again after Ray wrapped them.

An ``AttributionError`` raised in a Ray Data actor, a Ray task or a Ray Train worker reaches
the driver wrapped (``RayTaskError``, ``UserCodeException``, ``WorkerGroupError`` with one
failure per worker) and printed with remote tracebacks. The command line unwraps it here, so
the user sees the same one line, and exit status 2, as when the error is raised in the
driver. Errors that are not the user's to fix stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

from attribution_core.errors import AttributionError


def user_error(exc: BaseException) -> AttributionError | None:
    """The ``AttributionError`` at the root of ``exc`` (``exc`` itself, what Ray wrapped, or a
    worker's failure), or None when ``exc`` is not one of the user's errors."""
    stack: list[Any] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the exception the task raised
        if isinstance(cause, AttributionError):
            return cause
        if isinstance(e, AttributionError) and not hasattr(e, "cause"):
            return e
        stack += [cause, e.__cause__, e.__context__, getattr(e, "controller_failure", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def _error_classes() -> dict[str, type[AttributionError]]:
    found: dict[str, type[AttributionError]] = {}
    todo: list[type[AttributionError]] = [AttributionError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


def _rebuild(name: str, message: str) -> AttributionError:
    cls = _error_classes().get(name, AttributionError)
    try:
        return cls(message)
    except TypeError:  # a class whose constructor takes more than the message
        return AttributionError(message)


def encode_error(exc: AttributionError) -> dict[str, str]:
    """A plain form of ``exc`` that crosses a process boundary as data (not as a failure)."""
    return {"type": type(exc).__name__, "message": str(exc)}


def decode_error(data: dict[str, str]) -> AttributionError:
    """The error ``encode_error`` described, of the same class when this process knows it."""
    return _rebuild(data.get("type", ""), data.get("message", ""))


_TRACEBACK_ERROR = re.compile(r"^((?:[\w.]+\.)?)(\w*Error): (.+)$", re.MULTILINE)
_OUR_MODULES = ("attribution_core.", "pipelines.")


def error_in_traceback(text: str) -> AttributionError | None:
    """The last of this project's errors that a traceback in ``text`` shows, rebuilt (same
    class and message; an ``AttributionError`` when its class is not loaded here); None if
    there is none. Ray Data's failures and Serve's message for a
    replica that failed to start carry the error only as traceback text."""
    known = _error_classes()
    found = [m for m in _TRACEBACK_ERROR.finditer(text) if m.group(2) in known or m.group(1).startswith(_OUR_MODULES)]
    return _rebuild(found[-1].group(2), found[-1].group(3).strip()) if found else None
