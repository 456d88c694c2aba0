"""What an attribution answer holds, shared by the core's search and the endpoint (a base
module: no torch, so the HTTP ingress can import it)."""

from __future__ import annotations

from typing import Any, TypedDict

UNIFORM = "uniform"
"""The weighting with every parameter group weighted 1: always available, never learned."""


class Hit(TypedDict):
    """One training example in a top-k list, as a searcher partition finds it."""

    example_id: str
    score: float
    uri: str
    caption: str
    metadata: dict[str, Any]
    """The dataset columns the index keeps (``index.keep_columns``); {} when it keeps none."""
