"""What a model directory says about how it was made, and the dataset columns that follow.

A model trained here carries ``training.json`` next to its pipeline folders: the recipe
(the ``train`` / ``subset_train`` section it was trained with), the dataset, the columns its
captions or labels were read from, and its class names. That recipe is the one source of
truth for which columns mean caption and label: the index, the LDS universe and every query
read the columns the model learned from. A model brought from elsewhere (a Stable Diffusion
checkout, a UNet2DModel + scheduler) has no training.json; then the config's ``train``
section, where it names columns, stands in for it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from attribution_core.config import TrainConfig, from_mapping, to_mapping
from attribution_core.config_stages import IndexConfig
from attribution_core.errors import ConfigError, ModelLoadError
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.pipeline_dir import load_adapter

RECIPE_FILE = "training.json"


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
    """The content of a model's ``training.json``."""

    train: TrainConfig
    data: str | None
    """The dataset it was trained on."""
    columns: dict[str, str | None]
    """Columns its captions (``caption``) and labels (``label``) were read from; empty for
    models saved before these were recorded (the recipe's own settings then stand)."""
    label_names: list[str] | None

    @property
    def caption_column(self) -> str | None:
        return self.columns.get("caption") or self.train.caption_column

    @property
    def label_column(self) -> str | None:
        return self.columns.get("label") or self.train.label_column


def read_recipe(model_dir: str | Path) -> ModelRecipe | None:
    """The recipe of the model at ``model_dir``, or None when it has no training.json."""
    path = Path(model_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        train = from_mapping(TrainConfig, info["recipe"], "recipe")
    except (OSError, json.JSONDecodeError, KeyError, ConfigError) as exc:
        raise ModelLoadError(f"{path} is not a readable training record ({exc}); remove it if the model was "
                             "not trained by `attribution train-model`") from exc
    return ModelRecipe(train=train, data=info.get("data"), columns=dict(info.get("columns") or {}),
                       label_names=info.get("label_names"))


@dataclasses.dataclass(frozen=True)
class DataColumns:
    """Dataset columns of captions and labels (None: found by name, see ``data.readers``)."""

    caption: str | None
    label: str | None


def resolve_columns(model_dir: str | Path, train: TrainConfig | None, index: IndexConfig) -> DataColumns:
    """The caption and label columns to read for the model at ``model_dir``.

    They come from the model's recipe (its training.json, else ``train``: the config's
    section that trains it); ``index.caption_column`` / ``index.label_column`` may repeat
    them but never contradict them (``ConfigError``), and only fill in what no recipe names."""
    recipe = read_recipe(model_dir)
    if recipe is not None:
        known = {"caption": recipe.caption_column, "label": recipe.label_column}
        source = f"the model at {model_dir} was trained on"
        where = f"its {RECIPE_FILE}"
    else:
        known = {"caption": train.caption_column if train else None, "label": train.label_column if train else None}
        source = "the config's train section names"
        where = "train"
    out = {}
    for what, explicit in (("caption", index.caption_column), ("label", index.label_column)):
        expected = known[what]
        if explicit and expected and explicit != expected:
            raise ConfigError(
                f"index.{what}_column is {explicit!r} but {source} {what}s from column {expected!r} ({where}); "
                f"remove index.{what}_column: the model's recipe names the column")
        out[what] = expected or explicit
    return DataColumns(caption=out["caption"], label=out["label"])


_LORA_FIELDS = ("base", "lora_rank", "lora_alpha", "lora_targets")


def recipe_identity(train: TrainConfig, base_fingerprint: str | None = None) -> dict[str, Any]:
    """What decides the models a recipe trains, as a JSON-ready mapping (cache keys, "is
    this the same model?"): the recipe, and for a LoRA fine-tune the base model's
    fingerprint instead of its path. A recipe without LoRA reads as it did before the LoRA
    settings existed, so caches keyed by it stay valid. ``base_fingerprint``, when the
    caller already has it, saves loading the base again."""
    mapping = json.loads(json.dumps(to_mapping(train)))
    if not train.lora:
        return {k: v for k, v in mapping.items() if k not in _LORA_FIELDS}
    mapping.pop("base")
    mapping["base_fingerprint"] = base_fingerprint or model_fingerprint(load_adapter(train.base))
    return mapping


def same_recipe(record: dict[str, Any], train: TrainConfig) -> bool:
    """Whether a model's ``training.json`` (``record``) says it was trained by ``train``."""
    if "identity" in record:
        return record["identity"] == recipe_identity(train)
    try:  # written before identities were recorded
        return from_mapping(TrainConfig, record.get("recipe") or {}, "recipe") == train and not train.lora
    except ConfigError:
        return False
