"""LDS of the attribution bases, uniform vs learned weights (DESIGN 9, the D-TRAK protocol).

The attributed model and the models retrained on subsets share one recipe
(``subset_train``), so the universe is trained once in full by that recipe and indexed
under each basis' measurement; every basis then scores the same evaluation queries against
it, and the same retrained models give the ground truth for all of them:

- universe: the training set (or a seeded sample, ``evaluate.lds_examples``) minus the real
  images held out as queries; written as a dataset under ``<out>/lds/data``;
- the universe model: ``subset_train`` on the whole universe (``<out>/lds/model``);
- an index per measurement (``<out>/lds/index-loss``, ``index-square``, ``index-das``) and
  learned 'general' weights per basis (artifacts ``tracin``, ``trak``, ``dtrak``, ``das``);
- queries: images the universe model generates from training captions, plus the held-out
  real images; never the weight-learning queries (other seeds);
- truth: the negative loss of each subset model on each query, averaged over fixed
  timesteps and noise (``groundtruth.py``, cached);
- LDS: Spearman across subsets of ``sum_{n in s} tau(q, n)`` against that truth, averaged
  over queries, with a bootstrap interval.
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
import torch

from attribution_core.config import FeaturizeConfig, ProjectConfig, TrainConfig, to_mapping
from attribution_core.data.images import encode_png
from attribution_core.data.loading import load_training_data
from attribution_core.data.readers import RawExample, label_text, read_examples
from attribution_core.data.writers import read_marker, write_parquet_dataset
from attribution_core.errors import ConfigError, InputError
from attribution_core.evaluation.headroom import headroom
from attribution_core.evaluation.metrics import bootstrap_ci, lds, subset_masks
from attribution_core.features.query import query_batch
from attribution_core.features.seeding import stable_seed
from attribution_core.index.kernel import damped_kernel
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import load_index
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import is_model_dir
from attribution_core.models.recipe import RECIPE_FILE, read_recipe, same_recipe
from attribution_core.models.sampling import generate
from attribution_core.timing import Stopwatch
from attribution_core.weights.artifact import UNIFORM, weights_matrix
from pipelines.evaluation.groundtruth import ground_truth
from pipelines.models import load_model_dir
from pipelines.ray_runtime import cluster_gpus
from pipelines.steps import ensure_weights

log = logging.getLogger(__name__)

# basis -> (measurement of the features, scored with the index kernel)
BASIS_SPEC = {"tracin": ("loss", False), "trak": ("loss", True), "dtrak": ("square", True), "das": ("das", True)}

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
    examples = list(read_examples(cfg.data.uri, recipe.caption_column))
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
    """The ``subset_train`` model of the whole universe (the attributed model), trained unless there."""
    from attribution_core.models.training import train_to_dir

    path = folder / "model"
    info_file = path / "training.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("data") == universe.uri and same_recipe(info, cfg.subset_train):
            return str(path), None
        shutil.rmtree(path)
    log.info("training the LDS universe model (%d examples, %d steps)", len(universe.examples), cfg.subset_train.steps)
    return str(path), train_to_dir(universe.uri, cfg.subset_train, path)


def basis_config(cfg: ProjectConfig, basis: str, index_out: str) -> ProjectConfig:
    """The config a basis is indexed and learned with: its measurement, kernel and weights name."""
    measurement, kernel = BASIS_SPEC[basis]
    ecfg = cfg.evaluate
    return dataclasses.replace(
        cfg, featurize=dataclasses.replace(cfg.featurize, measurement=measurement),
        index=dataclasses.replace(cfg.index, out=index_out),
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
    batch = query_batch(adapter, images, prompts, labels if adapter.conditioning == "class" else None)
    if len(set(batch.example_ids)) != len(batch.example_ids):
        raise InputError("two evaluation queries are the same image; raise generation steps or change evaluate.seed")
    return batch, kinds


def output_config(cfg: ProjectConfig) -> FeaturizeConfig:
    """The model output's rows: the loss at fixed timesteps and noise draws per query."""
    ecfg = cfg.evaluate
    return dataclasses.replace(cfg.featurize, measurement="loss", noise_draws=ecfg.output_noise_draws,
                               timesteps=dataclasses.replace(cfg.featurize.timesteps, count=ecfg.output_timesteps,
                                                             strategy="uniform", values=()))


def full_scores(queries: torch.Tensor, weights: torch.Tensor, index, kernel, order: list[str]) -> np.ndarray:
    """``[A, Q, N]`` scores of every universe example (dataset order; quarantined rows 0)."""
    wq = preconditioned_queries(queries, weights, index.layout, kernel)  # [A, Q, k_total]
    scores = (wq.reshape(-1, wq.shape[-1]) @ index.features.T).reshape(wq.shape[0], wq.shape[1], -1)
    out = np.zeros((wq.shape[0], wq.shape[1], len(order)))
    position = {eid: i for i, eid in enumerate(order)}
    cols = [position[eid] for eid in index.example_ids]
    out[:, :, cols] = scores.double().numpy()
    return out


def _headroom(per_group: np.ndarray, masks: np.ndarray, actual: np.ndarray, document: dict[str, Any],
              ecfg) -> dict[str, Any]:
    """The evaluation-only headroom row of one basis: group weights fitted to the retrained
    outputs on half the subsets and queries, scored on the other halves (both ways), beside
    uniform and the learned weights on the same halves."""
    m = per_group.shape[0]
    found = headroom(per_group, masks, actual, {"uniform": np.full(m, 1.0 / m),
                                                "learned": np.array(document["aspects"]["general"]["weights"])},
                     seed=stable_seed("lds-headroom", ecfg.seed), resamples=ecfg.bootstrap)
    return {"lds": round(found["headroom"]["lds"], 4), "ci": [round(v, 4) for v in found["headroom"]["ci"]],
            "uniform": round(found["uniform"]["lds"], 4), "learned": round(found["learned"]["lds"], 4),
            "weights": dict(zip(document["groups"], np.mean(found["weights"], axis=0).round(4).tolist())),
            "shrinkage": found["shrinkage"],
            "per_query": {name: found[name]["per_query"] for name in ("headroom", "uniform", "learned")}}


@dataclasses.dataclass
class BasisScores:
    """Scores ``[2, Q, N]`` of one basis's LDS queries over the universe (uniform, learned), the
    same at each swept kernel damping, and ``[M, Q, N]`` under each group alone (headroom)."""

    pair: np.ndarray
    by_damping: dict[float, np.ndarray]
    per_group: np.ndarray | None
    kernel_choice: dict[str, Any] | None = None  # the index's kernel, its damping and how they were chosen


def basis_scores(features: torch.Tensor, index, document: dict[str, Any], with_kernel: bool, order: list[str],
                 ecfg) -> BasisScores:
    weights = weights_matrix(document, [UNIFORM, "general"])
    kernel = index.kernel if with_kernel else None
    swept = {d: full_scores(features, weights, index, damped_kernel(index.stored_features(), index.kernel, d), order)
             for d in (ecfg.damping_grid if with_kernel else ())}
    headroom_possible = ecfg.headroom and ecfg.subsets >= 4 and features.shape[0] >= 4
    per_group = (full_scores(features, torch.eye(len(index.layout.groups)), index, kernel, order)
                 if headroom_possible else None)
    stats = index.manifest["stats"]
    chosen = (stats.get("kernel_choice") or {"rule": "fixed", "kernel": stats["kernel"], "damping": stats["damping"]}
              if with_kernel else None)
    return BasisScores(full_scores(features, weights, index, kernel, order), swept, per_group, chosen)


def lds_row(scored: BasisScores, document: dict[str, Any], masks: np.ndarray, actual: np.ndarray,
            ecfg) -> tuple[dict[str, Any], dict[str, Any]]:
    """One basis's LDS table row (uniform, learned, their paired difference, the damping sweep
    and the headroom) and its per-query values."""
    row: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for i, name in enumerate(("uniform", "learned")):
        result = lds(scored.pair[i], masks, actual, seed=ecfg.seed, resamples=ecfg.bootstrap)
        row[name], row[f"{name}_ci"] = result["lds"], result["ci"]
        detail[name] = result["per_query"]
    # Paired over queries: the interval of mean(learned - uniform), the test of "learned beats uniform".
    diff = np.array(detail["learned"], dtype=float) - np.array(detail["uniform"], dtype=float)
    row["difference"] = float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")
    row["difference_ci"] = list(bootstrap_ci(diff, resamples=ecfg.bootstrap, seed=ecfg.seed))
    row["weights"] = dict(zip(document["groups"], document["aspects"]["general"]["weights"]))
    if scored.kernel_choice is not None:
        row["kernel_choice"] = scored.kernel_choice
    if scored.by_damping:
        row["damping"] = [{"damping": d, **{name: round(lds(sc[i], masks, actual, seed=ecfg.seed,
                                                           resamples=ecfg.bootstrap)["lds"], 4)
                                            for i, name in enumerate(("uniform", "learned"))}}
                          for d, sc in sorted(scored.by_damping.items())]
    if scored.per_group is not None:
        row["headroom"] = _headroom(scored.per_group, masks, actual, document, ecfg)
        detail["headroom"] = row["headroom"].pop("per_query")
    return row, detail


def run_lds(cfg: ProjectConfig, ray_address: str | None = None) -> dict[str, Any]:
    from pipelines.index.job import IndexRequest, run_index

    cfg = dataclasses.replace(cfg, subset_train=lds_recipe(cfg))
    ecfg = cfg.evaluate
    folder = Path(ecfg.out) / "lds"
    watch = Stopwatch(digits=1)
    lap = watch.lap
    universe = split_universe(cfg, folder)
    model_dir, trained = universe_model(cfg, universe, folder)
    lap("universe_model")

    indexes: dict[str, dict[str, Any]] = {}
    documents: dict[str, dict[str, Any]] = {}
    for basis in ecfg.bases:
        measurement = BASIS_SPEC[basis][0]
        bcfg = basis_config(cfg, basis, str(folder / f"index-{measurement}"))
        if measurement not in indexes:
            indexes[measurement] = run_index(bcfg, IndexRequest(dataset=universe.uri, model=model_dir,
                                                                 out=bcfg.index.out, ray_address=ray_address))
            lap("index")
        documents[basis], _ = ensure_weights(bcfg, bcfg.index.out, indexes[measurement]["version"], model_dir,
                                             ray_address)
        lap("weights")

    adapter = load_model_dir(model_dir)
    batch, kinds = lds_queries(cfg, adapter, model_dir, universe)
    order = [e.example_id for e in universe.examples]
    scored: dict[str, BasisScores] = {}
    for measurement, built in indexes.items():
        index = load_index(str(folder / f"index-{measurement}"), built["version"])
        features = version_featurizer(adapter, index.manifest, cfg.featurize.max_rows_per_pass).flat(batch)
        for basis in ecfg.bases:
            if BASIS_SPEC[basis][0] == measurement:
                scored[basis] = basis_scores(features, index, documents[basis], BASIS_SPEC[basis][1], order, ecfg)
    lap("attribute")

    data = load_training_data(universe.uri, cfg.subset_train)
    if data.example_ids != order:
        raise RuntimeError("the universe dataset does not read back in its written order")
    masks = subset_masks(len(order), ecfg.subsets, ecfg.subset_fraction, stable_seed("lds-subsets", ecfg.seed))
    gpus = ecfg.gpus_per_task if ecfg.gpus_per_task >= 0 else (1.0 if cluster_gpus() else 0.0)
    truth = ground_truth(data, masks, cfg.subset_train, batch, output_config(cfg), folder, gpus)
    lap("ground_truth")
    actual = -truth["outputs"]  # fit = -loss: an example that helps lowers the query's loss
    table: dict[str, dict[str, Any]] = {}
    detail: dict[str, dict[str, Any]] = {}
    for basis in ecfg.bases:
        table[basis], detail[basis] = lds_row(scored[basis], documents[basis], masks, actual, ecfg)
    lap("lds")
    return {
        "table": table, "per_query": detail, "queries": kinds,
        "n_subsets": int(ecfg.subsets), "n_queries": len(batch), "n_train": len(order),
        "universe_model": model_dir, "trained_universe_model": trained is not None,
        "indexes": {m: {"uri": str(folder / f"index-{m}"), "version": b["version"]} for m, b in indexes.items()},
        "recipe": to_mapping(cfg.subset_train),
        "output": f"negative loss averaged over {ecfg.output_timesteps} timesteps x {ecfg.output_noise_draws} noise draws",
        "ground_truth": {k: truth[k] for k in ("key", "trained", "cached", "seconds", "folder")},
        "stage_seconds": watch.seconds,
    }

