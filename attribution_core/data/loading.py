"""Load a dataset into memory as decoded training tensors."""

from __future__ import annotations

import logging

import numpy as np
import torch

from attribution_core.config import TrainConfig
from attribution_core.data.images import decode_image
from attribution_core.data.readers import read_examples
from attribution_core.errors import InputError
from attribution_core.models.training import TrainingData

log = logging.getLogger(__name__)


def load_training_data(uri: str, cfg: TrainConfig) -> TrainingData:
    """The dataset at ``uri`` prepared for the recipe ``cfg``."""
    return load_dataset(uri, cfg.resolution, cfg.channels, cfg.conditioning, cfg.caption_column, cfg.label_column)


def load_dataset(uri: str, resolution: int, channels: int, conditioning: str = "none",
                 caption_column: str | None = None, label_column: str | None = None) -> TrainingData:
    """Every example of ``uri`` decoded to ``resolution`` and ``channels``, with captions
    (``conditioning='text'``) or integer labels (``'class'``). A bad image raises
    ``ImageDecodeError`` naming its example."""
    ids, pixels, captions, raw_labels = [], [], [], []
    attributes: dict[str, list] = {}
    for ex in read_examples(uri, caption_column):
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
            if label_column not in ex.attributes:
                raise InputError(f"example {ex.example_id!r} has no label column {label_column!r}")
            raw_labels.append(str(ex.attributes[label_column]))
    if not ids:
        raise InputError(f"dataset {uri!r} holds no examples")
    if len(set(ids)) != len(ids):
        raise InputError(f"dataset {uri!r} repeats example ids; ids must be unique")
    data = TrainingData(example_ids=ids, pixels=torch.from_numpy(np.stack(pixels)),
                        attributes={k: v for k, v in attributes.items() if len(v) == len(ids)})
    if conditioning == "text":
        data.captions = captions
    if conditioning == "class":
        names = sorted(set(raw_labels))
        lookup = {name: i for i, name in enumerate(names)}
        data.labels = torch.tensor([lookup[v] for v in raw_labels], dtype=torch.long)
        data.label_names = names
    log.info("loaded %d examples from %s", len(ids), uri)
    return data
