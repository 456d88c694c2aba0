"""One index batch: source rows -> (feature rows, quarantined rows).

``index_batch`` is the single core call an index actor makes per batch. Every problem that
belongs to one example (undecodable image, wrong shape, missing caption or label,
non-finite feature) sends that example to the errors table with a reason; the rest of the
batch is featurized as usual, so one bad image never fails a job over millions.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import torch

from attribution_core.data.images import ImageDecodeError, decode_image
from attribution_core.errors import InputError
from attribution_core.features.featurize import Featurizer, nonfinite_rows
from attribution_core.index.schema import errors_table, features_table
from attribution_core.models.adapters import ExampleBatch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Shape limits applied while decoding (0 = none)."""

    min_side: int = 0
    max_aspect: float = 0.0


@dataclasses.dataclass
class BatchResult:
    features: pa.Table  # feature_schema rows
    errors: pa.Table  # ERRORS_SCHEMA rows


def _labels(values: list[str | None], names: list[str] | None, num_classes: int) -> list[int | None]:
    """Label strings -> class indices (by the model's class names when known, else as integers)."""
    out: list[int | None] = []
    lookup = {n: i for i, n in enumerate(names)} if names else None
    for v in values:
        if v is None:
            out.append(None)
        elif lookup is not None:
            out.append(lookup.get(v))
        else:
            out.append(int(v) if v.lstrip("-").isdigit() and 0 <= int(v) < num_classes else None)
    return out


def _prepare(featurizer: Featurizer, rows: pa.Table, limits: ImageLimits) -> tuple[list[int], list, list[str], list]:
    """Per-row checks: (indices of usable rows, their pixels, reasons for the others by
    index, class indices of all rows)."""
    adapter = featurizer.adapter
    c, h, _ = adapter.image_shape
    ids = rows.column("example_id").to_pylist()
    images = rows.column("image").to_pylist()
    captions = rows.column("caption").to_pylist()
    labels = _labels(rows.column("label").to_pylist(), adapter.label_names,
                     int(getattr(adapter.denoiser.config, "num_class_embeds", None) or 0))
    good, pixels, reasons = [], [], [""] * len(ids)
    for i, eid in enumerate(ids):
        if adapter.conditioning == "text" and captions[i] is None:
            reasons[i] = "missing caption: the model is text-conditioned"
            continue
        if adapter.conditioning == "class" and labels[i] is None:
            reasons[i] = "missing or unknown class label"
            continue
        try:
            pixels.append(decode_image(images[i], eid, h, c, min_side=limits.min_side, max_aspect=limits.max_aspect))
        except ImageDecodeError as exc:
            reasons[i] = str(exc)
            continue
        good.append(i)
    return good, pixels, reasons, labels


def _batch(rows: pa.Table, good: list[int], pixels: list, adapter_conditioning: str, *, labels: list) -> ExampleBatch:
    ids = rows.column("example_id").to_pylist()
    captions = rows.column("caption").to_pylist()
    return ExampleBatch(
        example_ids=tuple(ids[i] for i in good),
        pixels=torch.from_numpy(np.stack(pixels)) if pixels else torch.empty(0),
        captions=tuple(captions[i] for i in good) if adapter_conditioning == "text" else None,
        labels=torch.tensor([labels[i] for i in good]) if adapter_conditioning == "class" else None,
    )


def _featurize_isolating(featurizer: Featurizer, batch: ExampleBatch, reasons: list[str],
                         good: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Features (and row scales) of ``batch``; if the batch as a whole is refused, each
    example alone, so the one at fault is quarantined (features do not depend on batch
    composition)."""
    try:
        return good, *featurizer.flat_and_scale(batch)
    except InputError:
        kept, parts = [], []
        for j, i in enumerate(good):
            try:
                parts.append(featurizer.flat_and_scale(batch.select(j, j + 1)))
                kept.append(i)
            except InputError as exc:
                reasons[i] = str(exc)
        flat = torch.cat([f for f, _ in parts]) if parts else torch.empty(0, featurizer.layout.k_total)
        scale = None
        if featurizer.row_scaled:
            scale = torch.cat([s for _, s in parts]) if parts else torch.empty(0)
        return kept, flat, scale


def index_batch(featurizer: Featurizer, rows: pa.Table, dtype: str = "float16",
                limits: ImageLimits = ImageLimits()) -> BatchResult:
    """Featurize ``rows`` (``SOURCE_SCHEMA``); quarantine the examples that cannot be."""
    adapter = featurizer.adapter
    good, pixels, reasons, labels = _prepare(featurizer, rows, limits)
    kept: list[int] = []
    flat = torch.empty(0, featurizer.layout.k_total)
    scale = torch.empty(0) if featurizer.row_scaled else None
    if good:
        batch = _batch(rows, good, pixels, adapter.conditioning, labels=labels)
        kept, flat, scale = _featurize_isolating(featurizer, batch, reasons, good)
    finite = ~nonfinite_rows(flat) if len(kept) else torch.ones(0, dtype=torch.bool)
    if scale is not None and len(kept):
        finite &= torch.isfinite(scale)
    for i, ok in zip(kept, finite.tolist()):
        if not ok:
            reasons[i] = "non-finite feature (NaN or Inf in the gradient)"
    final = [i for i, ok in zip(kept, finite.tolist()) if ok]
    keep_rows = torch.tensor([j for j, ok in enumerate(finite.tolist()) if ok], dtype=torch.long)
    features = features_table(rows.take(pa.array(final, type=pa.int64())), flat[keep_rows], featurizer.layout, dtype,
                              scale=scale[keep_rows] if scale is not None else None)
    bad = [i for i, r in enumerate(reasons) if r]
    errors = errors_table([
        {"example_id": rows.column("example_id")[i].as_py(), "content_hash": rows.column("content_hash")[i].as_py(),
         "uri": rows.column("uri")[i].as_py(), "reason": reasons[i]}
        for i in bad
    ])
    if bad:
        log.warning("quarantined %d of %d examples in this batch", len(bad), rows.num_rows)
    return BatchResult(features=features, errors=errors)
