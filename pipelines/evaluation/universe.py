"""The LDS universe and what is made from it once for every basis (ARCHITECTURE §9, the D-TRAK
protocol): the attributed model and the models retrained on subsets share one recipe
(``subset_train``), so the universe is trained once in full by that recipe and indexed under
each basis' measurement; every basis then scores the same evaluation queries against it.

- universe: the training set (or a seeded sample, ``evaluate.lds_examples``) minus the real
  images held out as queries; written as a dataset under ``<out>/lds/data``;
- the universe model: ``subset_train`` on the whole universe (``<out>/lds/model``), keeping
  ``evaluate.checkpoints`` checkpoints along the way for the ensembles (TracIn-CP);
- queries: images the universe model generates from training captions, plus the held-out
  real images; never the weight-learning queries (other seeds);
- the model output the ground truth measures: the loss at fixed timesteps and noise draws.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from attribution_core.config import FeaturizeConfig, ProjectConfig, TrainConfig
from attribution_core.data.images import encode_png
from attribution_core.data.readers import RawExample, label_text, read_examples
from attribution_core.data.writers import read_marker, write_parquet_dataset
from attribution_core.errors import ConfigError, InputError
from attribution_core.features.query import query_batch
from attribution_core.index.kernel import LAYER_BLOCK
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.checkpoints import model_checkpoints
from attribution_core.models.pipeline_dir import is_model_dir
from attribution_core.models.recipe import RECIPE_FILE, read_recipe, same_recipe
from attribution_core.models.sampling import generate
from attribution_core.models.training_dir import train_to_dir
from attribution_core.seeding import stable_seed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Basis:
    """An attribution basis of the LDS table: the measurement its features are gradients of,
    whether its scores go through the index's kernel, and what it computes, in words."""

    name: str
    measurement: str
    kernel: bool
    label: str


BASES = {
    "tracin": Basis("tracin", "loss", False,
                    "TracIn-CP: loss gradients, K = I, summed over checkpoints (learning-rate weighted)"),
    "trak": Basis("trak", "loss", True, "TRAK: loss gradients, kernel"),
    "dtrak": Basis("dtrak", "square", True, "D-TRAK: squared-output-norm gradients, kernel"),
    "das": Basis("das", "das", True, "DAS-style: output-mean gradients, kernel, times a per-example residual scale "
                 "(a simplification; the published DAS is the 'DAS as published' row)"),
}


def basis_label(name: str, checkpoints: int) -> str:
    """What a basis computes with ``checkpoints`` checkpoints of the attributed model."""
    if name == "tracin" and checkpoints <= 1:
        return "gradient dot product (TracIn at the final checkpoint only): loss gradients, K = I"
    return BASES[name].label


@dataclasses.dataclass
class Universe:
    uri: str  # the universe written as a dataset
    examples: list[RawExample]  # in the dataset's order
    heldout: list[RawExample]  # real query images, never trained on

    @property
    def digest(self) -> str:
        return hashlib.blake2b("\n".join(e.example_id for e in self.examples).encode(), digest_size=8).hexdigest()


def lds_recipe(cfg: ProjectConfig) -> TrainConfig:
    """The recipe LDS retrains with: ``subset_train``, else the attributed model's own
    (its training.json, or ``train`` when the model is still to be trained with it)."""
    if cfg.subset_train is not None:
        return cfg.subset_train
    path = Path(cfg.model.path)
    if not is_model_dir(path):
        return cfg.train
    recipe = read_recipe(path)
    if recipe is None:
        raise ConfigError(f"LDS retrains the model on data subsets and needs its training recipe: {path} has no "
                          f"{RECIPE_FILE} and the config has no subset_train section; add one (see configs/demo.yaml) "
                          "or run `attribution evaluate --skip-lds`")
    return recipe.train


def split_universe(cfg: ProjectConfig, folder: Path) -> Universe:
    """Seeded choice of the held-out query images and of the universe; the universe is
    written under ``folder/data`` unless the same one is there."""
    ecfg, recipe = cfg.evaluate, cfg.subset_train
    examples = list(read_examples(cfg.data.uri, recipe.caption_column, image_column=cfg.data.image_column,
                                  id_column=cfg.data.id_column))
    if recipe.conditioning == "text":
        examples = [e for e in examples if isinstance(e.caption, str)]
    order = np.random.default_rng(stable_seed("lds-universe", ecfg.seed)).permutation(len(examples))
    held = sorted(order[: ecfg.heldout_queries].tolist())
    rest = order[ecfg.heldout_queries :]
    if ecfg.lds_examples:
        rest = rest[: ecfg.lds_examples]
    if len(rest) < max(4, ecfg.lds_examples):
        raise ConfigError(f"evaluate.lds_examples={ecfg.lds_examples} and heldout_queries={ecfg.heldout_queries} need "
                          f"{ecfg.lds_examples + ecfg.heldout_queries} examples; {cfg.data.uri} has {len(examples)} usable")
    universe = Universe(uri=str(folder / "data"), examples=[examples[i] for i in sorted(rest.tolist())],
                        heldout=[examples[i] for i in held])
    marker = read_marker(universe.uri)
    if marker is not None and marker.get("universe") == universe.digest:
        return universe
    if marker is not None or Path(universe.uri).exists():
        shutil.rmtree(universe.uri)
    # Columns keep their names (the recipe's caption and label columns name them) and labels
    # their spelling, so the universe model, its index and its queries read what the user's
    # data holds.
    caption = recipe.caption_column or "caption"
    columns = sorted({k for e in universe.examples for k in e.attributes} - {caption})
    schema = pa.schema([("example_id", pa.string()), ("image", pa.binary()), (caption, pa.string()),
                        *((c, pa.string()) for c in columns)])
    rows = ({"example_id": e.example_id, "image": e.image, caption: e.caption,
             **{c: label_text(e.attributes.get(c)) for c in columns}}
            for e in universe.examples)
    write_parquet_dataset(universe.uri, rows, schema, {"kind": "lds-universe", "source": cfg.data.uri,
                                                       "universe": universe.digest})
    return universe


def universe_model(cfg: ProjectConfig, universe: Universe, folder: Path) -> tuple[str, dict[str, Any] | None]:
    """The ``subset_train`` model of the whole universe (the attributed model) with its
    ``evaluate.checkpoints`` checkpoints, trained unless there (training is deterministic, so
    a model trained again to keep more checkpoints is the same model)."""
    path = folder / "model"
    info_file = path / "training.json"
    wanted = cfg.evaluate.checkpoints
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if (info.get("data") == universe.uri and same_recipe(info, cfg.subset_train)
                and len(model_checkpoints(path)) == wanted):
            return str(path), None
        shutil.rmtree(path)
    log.info("training the LDS universe model (%d examples, %d steps, %d checkpoints)", len(universe.examples),
             cfg.subset_train.steps, wanted)
    return str(path), train_to_dir(universe.uri, cfg.subset_train, path, checkpoints=wanted)


def basis_config(cfg: ProjectConfig, basis: str, index_out: str) -> ProjectConfig:
    """The config a basis is indexed and learned with: its measurement, kernel and weights name.

    An index that no evaluated basis scores through the kernel of (the loss gradients of
    TracIn without TRAK) keeps the Gram and a per-layer kernel (the smallest blocks) at the
    fixed damping: choosing one by the objective would generate and score queries for nothing."""
    measurement, kernel = BASES[basis].measurement, BASES[basis].kernel
    ecfg = cfg.evaluate
    index = dataclasses.replace(cfg.index, out=index_out)
    if not any(BASES[b].kernel for b in ecfg.bases if BASES[b].measurement == measurement):
        index = dataclasses.replace(index, kernel=LAYER_BLOCK, damping_rule="fixed")
    return dataclasses.replace(
        cfg, featurize=dataclasses.replace(cfg.featurize, measurement=measurement), index=index,
        weights=dataclasses.replace(cfg.weights, name=basis, use_kernel=kernel, aspects=("general",),
                                    queries_per_aspect=ecfg.weights_queries))


def lds_queries(cfg: ProjectConfig, adapter, model_dir: str,
                universe: Universe) -> tuple[ExampleBatch, list[dict[str, Any]]]:
    """The evaluation queries: generated by the universe model (prompted with universe
    captions, or unprompted / per class) and the held-out real images."""
    ecfg = cfg.evaluate
    n = ecfg.generated_queries
    images: list[bytes] = []
    prompts: list[str | None] = []
    labels: list[Any] = []
    kinds: list[dict[str, Any]] = []
    if n:
        text = adapter.conditioning == "text"
        captions = sorted({e.caption for e in universe.examples if e.caption})
        rng = random.Random(stable_seed("lds-query-prompts", ecfg.seed))
        asked = [rng.choice(captions) for _ in range(n)] if text else None
        generated = generate(adapter, prompts=asked,
                             labels=list(range(adapter.num_classes)) or None,
                             n=n, seed=stable_seed("evaluation-queries", ecfg.seed, "lds"),
                             guidance=cfg.weights.guidance, steps=cfg.weights.sample_steps)
        for g in generated:
            images.append(encode_png(g.image))
            prompts.append(g.prompt)
            labels.append(g.label)
            kinds.append({"kind": "generated", "prompt": g.prompt})
    label_column = read_recipe(model_dir).label_column if adapter.conditioning == "class" else None
    for e in universe.heldout:
        label = label_text(e.attributes.get(label_column)) if label_column else None
        if label_column and label not in (adapter.label_names or []):
            log.warning("held-out query %s is left out: its class %r is not among the universe's", e.example_id, label)
            continue
        images.append(e.image)
        prompts.append(e.caption)
        labels.append(label)
        kinds.append({"kind": "heldout", "example_id": e.example_id, "prompt": e.caption})
    batch = query_batch(adapter, images, prompts=prompts, labels=labels if adapter.conditioning == "class" else None)
    if len(set(batch.example_ids)) != len(batch.example_ids):
        raise InputError("two evaluation queries are the same image; raise generation steps or change evaluate.seed")
    return batch, kinds


def output_config(cfg: ProjectConfig) -> FeaturizeConfig:
    """The model output's rows: the loss at fixed timesteps and noise draws per query."""
    ecfg = cfg.evaluate
    return dataclasses.replace(cfg.featurize, measurement="loss", noise_draws=ecfg.output_noise_draws,
                               timesteps=dataclasses.replace(cfg.featurize.timesteps, count=ecfg.output_timesteps,
                                                             strategy="uniform", values=()))
