"""The main job's steps, each skipped when its result is already there: dataset, model,
index, learned weights. ``attribution demo`` and ``attribution evaluate`` run them in order."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, TypedDict

from attribution_core.config import DataConfig, ProjectConfig, to_mapping
from attribution_core.data.readers import dataset_present
from attribution_core.data.writers import read_marker, write_synthetic
from attribution_core.errors import ConfigError, ManifestMismatchError
from attribution_core.index.store import IndexStore
from attribution_core.models.pipeline_dir import is_model_dir
from attribution_core.models.training_dir import TrainingSummary, train_to_dir
from attribution_core.weights.artifact import artifact_path, check_weights
from pipelines.index.job import IndexRequest, IndexSummary, run_index
from pipelines.models import ensure_model
from pipelines.weights.job import WeightsRequest, learn_weights

log = logging.getLogger(__name__)


def ensure_dataset(data: DataConfig) -> bool:
    """The dataset at ``data.uri``: the user's own when anything is there (any layout the
    readers know), else the synthetic set written there when ``data.synthetic`` asks for it.
    True when it was written now."""
    if dataset_present(data.uri):
        marker = read_marker(data.uri)
        wanted = data.synthetic
        if marker and marker.get("kind") == "synthetic" and wanted and (
                marker.get("set", "shapes"), marker.get("n"), marker.get("seed"), marker.get("size")
        ) != (wanted.kind, wanted.n, wanted.seed, wanted.size):
            log.warning("%s holds a synthetic set drawn with other settings than data.synthetic; using it as it is",
                        data.uri)
        return False
    if data.synthetic is None:
        raise ConfigError(f"data.uri: {data.uri!r} holds no dataset; point it at yours (Parquet with an 'image' "
                          "column, an image folder with metadata.jsonl, or one sub-folder of images per class) or "
                          "add a data.synthetic section to have the synthetic set drawn there")
    s = data.synthetic
    log.info("writing the synthetic %s dataset (%d images) to %s", s.kind, s.n, data.uri)
    write_synthetic(data.uri, s.n, s.seed, size=s.size, holdout=s.holdout, kind=s.kind)
    return True


def ensure_base(cfg: ProjectConfig) -> TrainingSummary | None:
    """Train the base model of the LoRA recipes (the ``base`` section) unless it is there;
    the training summary, or None when nothing was trained."""
    if cfg.base is None or is_model_dir(cfg.base.path):
        return None
    ensure_dataset(cfg.base.data)
    log.info("training the base model (%d steps) into %s", cfg.base.train.steps, cfg.base.path)
    return train_to_dir(cfg.base.data.uri, cfg.base.train, Path(cfg.base.path))


class Prepared(TypedDict, total=False):
    """What ``prepare`` did: the base model trained, the dataset ``"written"``, the model
    trained (its summary) or ``"built untrained (...)"``."""

    base: TrainingSummary
    data: str
    model: TrainingSummary | str


def prepare(cfg: ProjectConfig, model: bool = True) -> Prepared:
    """Write the synthetic dataset (when asked for and absent) and (``model``) train the model
    when it is not there yet; say what was done."""
    done: Prepared = {}
    base = ensure_base(cfg)
    if base is not None:
        done["base"] = base
    if ensure_dataset(cfg.data):
        done["data"] = "written"
    path = Path(cfg.model.path)
    if model and not is_model_dir(path):
        if cfg.model.build:
            ensure_model(cfg.model)
            done["model"] = f"built untrained ({cfg.model.build})"
        else:
            log.info("training the model (%d steps) into %s", cfg.train.steps, path)
            done["model"] = train_to_dir(cfg.data.uri, cfg.train, path, read_options={
                "image_column": cfg.data.image_column, "id_column": cfg.data.id_column})
    return done


def build_index(cfg: ProjectConfig, ray_address: str | None = None) -> IndexSummary:
    """The index of ``data.uri`` under ``index.out`` (incremental; "up to date" when nothing changed)."""
    return run_index(cfg, IndexRequest(dataset=cfg.data.uri, model=str(ensure_model(cfg.model)), out=cfg.index.out,
                                       ray_address=ray_address, base=cfg.model.base))


def ensure_weights(cfg: ProjectConfig, index: str, version: str, *, model: str | None = None,
                   ray_address: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The weights document ``weights.name`` of an index version, learned first unless one
    learned with the same settings is there. Returns (document, the learning summary or None)."""
    store = IndexStore(index)
    path = artifact_path(version, cfg.weights.name)
    document = store.read_json(path)
    if document is not None:
        try:
            check_weights(document, store.manifest(version))
            if any("choice" not in a for a in document["aspects"].values()):
                log.info("weights %s were learned before the served choice was recorded; learning them again", path)
            elif document.get("settings") == json.loads(json.dumps(to_mapping(cfg.weights), default=str)):
                return document, None
            else:
                log.info("weights %s were learned with other settings; learning them again", path)
        except ManifestMismatchError as exc:
            log.info("weights %s do not fit this version (%s); learning them again", path, exc)
    summary = learn_weights(cfg, WeightsRequest(index=index, version=version, model=model, ray_address=ray_address))
    document = store.read_json(path)
    if document is None:
        raise ManifestMismatchError(f"learning weights wrote no {store.uri}/{path}; is the index root writable?")
    return document, summary
