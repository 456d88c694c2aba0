"""When too much of a dataset is quarantined, say why in one line and what to change.

A build whose examples mostly land in ``errors/`` is almost always a setting, not bad data
(no label column, captions under another name, images smaller than the model expects).
Committing it would hand an almost empty index to weight learning and serving, so the index
job refuses it with the most common reasons, each with its count, one example id and the
setting that usually fixes it.
"""

from __future__ import annotations

import re
from collections import Counter

from attribution_core.errors import QuarantineError

#: (pattern of a reason, what usually fixes it). Reasons are written in ``index.batch`` and
#: ``data.images``; the first matching pattern gives the hint.
HINTS = (
    (r"class label", "set train.label_column to the column holding each image's class (the model's class "
                     "names, or integers 0..N-1 for a model without recorded names)"),
    (r"missing caption", "set train.caption_column to the dataset's caption column"),
    (r"shorter side is below", "lower index.min_image_side, or use larger images"),
    (r"more elongated", "raise index.max_aspect_ratio, or crop the images"),
    (r"no image bytes|cannot decode", "check the dataset's image column or files"),
    (r"non-finite feature", "the model's gradients overflow: check its weights or use featurize.precision float32"),
)


def reason_kind(reason: str) -> str:
    """A reason without what is particular to one example (its id, sizes), so reasons of
    one kind count together."""
    kind = re.sub(r"^example '.*?': ", "", reason)
    return re.sub(r"\d+", "N", kind)


def _hint(reason: str) -> str | None:
    return next((hint for pattern, hint in HINTS if re.search(pattern, reason)), None)


def quarantine_summary(errors: list[tuple[str, str]], total: int, top: int = 3) -> str:
    """One line: how many of ``total`` examples were quarantined, and the ``top`` most common
    reasons with counts, an example id each and a hint. ``errors`` is ``(example_id, reason)``."""
    kinds = Counter(reason_kind(r) for _, r in errors)
    first: dict[str, tuple[str, str]] = {}
    for eid, reason in sorted(errors):
        first.setdefault(reason_kind(reason), (eid, re.sub(r"^example '.*?': ", "", reason)))
    parts = []
    for kind, count in kinds.most_common(top):
        eid, text = first[kind]
        hint = _hint(text)
        parts.append(f"{text} ({count:,}; e.g. {eid})" + (f" — {hint}" if hint else ""))
    more = len(kinds) - min(top, len(kinds))
    tail = f"; and {more} other reason(s)" if more else ""
    return f"{len(errors):,} of {total:,} examples quarantined: {'; '.join(parts)}{tail}"


def too_many_quarantined(count: int, total: int, max_fraction: float) -> bool:
    """More than ``max_fraction`` of ``total`` examples quarantined, or every one of them."""
    return count > 0 and (count > max_fraction * total or count >= total)


def check_quarantine(errors: list[tuple[str, str]], total: int, max_fraction: float, scope: str = "the dataset") -> None:
    """Raise ``QuarantineError`` when ``too_many_quarantined``; ``errors`` is ``(example_id, reason)``
    among ``total`` examples (``scope`` says which)."""
    if not too_many_quarantined(len(errors), total, max_fraction):
        return
    raise QuarantineError(f"{quarantine_summary(errors, total)}. Nothing was committed (more than "
                          f"index.max_quarantine_fraction={max_fraction:g} of {scope})")
