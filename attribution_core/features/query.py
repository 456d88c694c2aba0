"""Query images into features: bytes in, exactly as index rows are featurized.

A query is keyed by the hash of its bytes (``content_id``): the same image always gets the
same timesteps and noise draws, wherever it is featurized (endpoint, evaluation, weights).
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.data.images import decode_image
from attribution_core.errors import InputError
from attribution_core.features.featurize import Featurizer
from attribution_core.seeding import content_id
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.models.vocabulary import check_prompts


def resolve_label(adapter: DiffusersAdapter, label: str | int | None) -> int:
    """Class index of ``label`` (a name of ``adapter.label_names`` or an index)."""
    names = adapter.label_names or []
    n = int(getattr(adapter.denoiser.config, "num_class_embeds", 0) or len(names))
    if label is None:
        raise InputError(f"this model is class-conditional: send a label ({', '.join(names) or f'0..{n - 1}'})")
    if isinstance(label, str):
        if label not in names:
            raise InputError(f"unknown label {label!r}; this model knows {', '.join(names) or f'indices 0..{n - 1}'}")
        return names.index(label)
    if not 0 <= label < n:
        raise InputError(f"label {label} is out of range 0..{n - 1}")
    return label


def query_batch(adapter: DiffusersAdapter, images: list[bytes], *, prompts: list[str | None] | None = None,
                labels: list[str | int | None] | None = None, contrast: list[str] | None = None) -> ExampleBatch:
    """Decode ``images`` (``ImageDecodeError`` names the bad one) into a batch for ``adapter``;
    text models get ``prompts`` (missing -> the empty prompt, i.e. unconditional) and, for
    Concept-TRAK's contrastive features, ``contrast``: each prompt without its concept."""
    c, size = adapter.image_shape[0], adapter.image_shape[1]
    if adapter.conditioning == "text":
        check_prompts(prompts or [], adapter.vocabulary, "prompt")
    ids = tuple(content_id(data) for data in images)
    pixels = torch.from_numpy(np.stack([decode_image(data, i, size, c) for data, i in zip(images, ids)]))
    prompts = prompts or [None] * len(images)
    return ExampleBatch(
        example_ids=ids, pixels=pixels,
        captions=tuple(p or "" for p in prompts) if adapter.conditioning == "text" else None,
        labels=(torch.tensor([resolve_label(adapter, lab) for lab in (labels or [None] * len(images))])
                if adapter.conditioning == "class" else None),
        contrast_captions=tuple(contrast) if contrast is not None else None)


def featurize_images(featurizer: Featurizer, images: list[bytes], *, prompts: list[str | None] | None = None,
                     labels: list[str | int | None] | None = None, contrast: list[str] | None = None) -> torch.Tensor:
    """``Tensor[len(images), k_total]`` float32 features of encoded images."""
    return featurizer.flat(query_batch(featurizer.adapter, images, prompts=prompts, labels=labels, contrast=contrast))
