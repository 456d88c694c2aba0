"""Which weighting the endpoint serves for an aspect: the measured best, uniform unless beaten.

One rule for every aspect and every kind of evidence: a learned weighting replaces uniform
weights only when its paired 95 % interval against uniform lies above zero; among those, the
one of the highest mean gain answers (ties: the earlier candidate). Uniform weights need no
learning and cannot be worse than themselves, so without evidence that learned weights do
better they are the answer.

The evidence, in order of preference:

- ``lds``: ``attribution evaluate``'s linear datamodeling score of the index's basis (the
  general aspect), with an interval that resamples queries and retrained subsets;
- ``validation``: Recall@k of the asked attribute values on validation queries generated
  by ``learn-weights`` (every aspect the dataset has columns for; for 'general', the share of
  all attribute values, or of the class label, a top-k example shares with the query);
- ``unvalidated``: no evidence. An aspect then answers with its own weights (they are the
  only thing that tells the aspects apart), 'general' with uniform weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attribution_core.answers import UNIFORM
from attribution_core.weights.artifact import Choice, ServedAnswer, unvalidated_choice

RULE = "uniform unless a learned weighting's paired 95% interval against uniform lies above 0"
EVIDENCE = ("lds", "validation", "unvalidated")


def candidates(aspect: str, learned: Sequence[str]) -> list[str]:
    """The weightings that may answer ``aspect``, in the order ties are broken."""
    return [name for name in dict.fromkeys((aspect, "general")) if name in learned] + [UNIFORM]


def choose(gains: dict[str, Sequence[float]], order: Sequence[str]) -> str:
    """The answer under ``RULE``: ``gains`` maps each learned candidate to ``(mean, lo, hi)``
    of its paired gain over uniform; ``order`` breaks ties (uniform when nothing clears 0)."""
    cleared = [name for name in order if name != UNIFORM and name in gains and gains[name][1] > 0]
    if not cleared:
        return UNIFORM
    return max(cleared, key=lambda name: (gains[name][0], -list(order).index(name)))


def served_choice(aspect: str, validation: Choice | None) -> ServedAnswer:
    """The weights artifact's fields for an aspect's choice: ``answered_by`` and ``choice``
    (its evidence), from the aspect's validation, or without one the aspect's own weights
    (uniform for 'general')."""
    if validation:
        chosen = Choice(answered_by=validation["answered_by"], by=validation["by"], rule=validation["rule"],
                        gains=validation["gains"])
    else:
        chosen = Choice(answered_by=unvalidated_choice(aspect), by="unvalidated", rule=RULE, gains={})
    return ServedAnswer(answered_by=chosen["answered_by"], choice=chosen)


def record(answered_by: str, by: str, gains: dict[str, Sequence[float]], **detail: Any) -> Choice:
    """The artifact's record of a choice: what answers, from which evidence, the paired
    gains over uniform it saw, and whatever says where the evidence came from."""
    if by not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {by!r}")
    return {"answered_by": answered_by, "by": by, "rule": RULE,
            "gains": {name: [round(float(v), 4) for v in g] for name, g in gains.items()}, **detail}
