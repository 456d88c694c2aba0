"""Load a dataset into memory as decoded training tensors."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from attribution_core.config import TrainConfig
from attribution_core.data.images import decode_image
from attribution_core.data.readers import IMAGE_COLUMN, LABEL_COLUMNS, caption_column_of, label_text, read_examples
from attribution_core.errors import InputError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingData:
    """Decoded examples: ``pixels`` ``Tensor[N, C, H, W]`` float32 in [-1, 1] at the recipe's
    resolution; ``captions`` (text) or ``labels`` ``Tensor[N]`` int64 (class)."""

    example_ids: list[str]
    pixels: torch.Tensor
    captions: list[str] | None = None
    labels: torch.Tensor | None = None
    label_names: list[str] | None = None
    attributes: dict[str, list] = dataclasses.field(default_factory=dict)
    """Other dataset columns per example (e.g. subject, style, background)."""
    columns: dict[str, str | None] = dataclasses.field(default_factory=dict)
    """The dataset columns the captions and labels were read from (``caption``, ``label``)."""

    def subset(self, index: torch.Tensor) -> TrainingData:
        idx = index.tolist()
        return TrainingData(
            example_ids=[self.example_ids[i] for i in idx],
            pixels=self.pixels[index],
            captions=None if self.captions is None else [self.captions[i] for i in idx],
            labels=None if self.labels is None else self.labels[index],
            label_names=self.label_names,
            attributes={k: [v[i] for i in idx] for k, v in self.attributes.items()},
            columns=self.columns,
        )


def load_training_data(uri: str, cfg: TrainConfig, *, image_column: str = IMAGE_COLUMN,
                       id_column: str | None = None) -> TrainingData:
    """The dataset at ``uri`` prepared for the recipe ``cfg`` (Parquet: images and ids from
    the named columns)."""
    return load_dataset(uri, cfg.resolution, cfg.channels, conditioning=cfg.conditioning,
                        caption_column=cfg.caption_column, label_column=cfg.label_column,
                        image_column=image_column, id_column=id_column)


def class_names(labels: list[str]) -> list[str]:
    """Class names in class-index order: integer labels by value (label 3 is class 3 when the
    labels are 0..N-1), any other labels alphabetically."""
    distinct = set(labels)
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def load_dataset(uri: str, resolution: int, channels: int, *, conditioning: str = "none",
                 caption_column: str | None = None, label_column: str | None = None,
                 image_column: str = IMAGE_COLUMN, id_column: str | None = None) -> TrainingData:
    """Every example of ``uri`` decoded to ``resolution`` and ``channels``, with captions
    (``conditioning='text'``) or integer labels (``'class'``; the column ``label_column``,
    or the first of ``LABEL_COLUMNS`` the dataset has). A bad image raises
    ``ImageDecodeError`` naming its example. ``data.columns`` says which columns were read."""
    ids, pixels, captions, raw_labels = [], [], [], []
    attributes: dict[str, list] = {}
    for ex in read_examples(uri, caption_column, image_column=image_column, id_column=id_column):
        ids.append(ex.example_id)
        for key, value in ex.attributes.items():
            attributes.setdefault(key, []).append(value)
        pixels.append(decode_image(ex.image, ex.example_id, resolution, channels))
        if conditioning == "text":
            if not isinstance(ex.caption, str):
                raise InputError(f"example {ex.example_id!r} has no caption; a text-conditioned model needs one "
                                 "(set train.caption_column, or train with conditioning 'none')")
            captions.append(ex.caption)
        if conditioning == "class":
            if label_column is None:
                label_column = next((c for c in LABEL_COLUMNS if c in ex.attributes), None)
                if label_column is None:
                    raise InputError(f"dataset {uri!r} has none of the label columns {', '.join(LABEL_COLUMNS)}; "
                                     f"set train.label_column (columns: {', '.join(ex.attributes) or 'none'})")
            label = label_text(ex.attributes.get(label_column))
            if label is None:
                raise InputError(f"example {ex.example_id!r} has no label in column {label_column!r}; "
                                 "a class-conditional model needs one per image (set train.label_column)")
            raw_labels.append(label)
    if not ids:
        raise InputError(f"dataset {uri!r} holds no examples")
    if len(set(ids)) != len(ids):
        raise InputError(f"dataset {uri!r} repeats example ids; ids must be unique")
    data = TrainingData(example_ids=ids, pixels=torch.from_numpy(np.stack(pixels)),
                        attributes={k: v for k, v in attributes.items() if len(v) == len(ids)})
    if conditioning == "text":
        data.captions = captions
    if conditioning == "class":
        names = class_names(raw_labels)
        lookup = {name: i for i, name in enumerate(names)}
        data.labels = torch.tensor([lookup[v] for v in raw_labels], dtype=torch.long)
        data.label_names = names
    data.columns = {"caption": caption_column_of(uri, caption_column) if conditioning == "text" else None,
                    "label": label_column if conditioning == "class" else None}
    log.info("loaded %d examples from %s", len(ids), uri)
    return data
