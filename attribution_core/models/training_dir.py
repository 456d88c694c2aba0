"""A trained model on disk: the diffusers pipeline directory (or a LoRA directory) with the
``training.json`` that says how it was made, and ``train_to_dir``, which trains a recipe on a
dataset and saves it there (with checkpoints when asked)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, TypedDict

from attribution_core.config import TrainConfig, to_mapping
from attribution_core.data.loading import load_training_data
from attribution_core.models.checkpoints import checkpoint_dir
from attribution_core.models.lora import save_lora
from attribution_core.models.pipeline_dir import save_pipeline
from attribution_core.models.recipe import recipe_identity
from attribution_core.models.training import TrainedModel, learning_rate_at, train_model

log = logging.getLogger(__name__)


def save_model(model: TrainedModel, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save as a diffusers pipeline directory (+ ``training.json`` describing how it was made)."""
    adapter = model.adapter
    if adapter.lora is not None:  # the adapters and a pointer to the base
        out = save_lora(adapter.denoiser, adapter.lora, out_dir, model.cfg.base,
                        base_fingerprint=model.base_fingerprint)
    else:
        components: dict[str, Any] = {"unet": adapter.denoiser, "scheduler": adapter.scheduler}
        if adapter.text_encoder is not None:
            components.update(text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer)
        out = save_pipeline(components, out_dir)
    info = {
        "recipe": to_mapping(model.cfg),
        "seconds": round(model.seconds, 2),
        "steps": len(model.losses),
        "final_loss": sum(model.losses[-50:]) / max(1, len(model.losses[-50:])),
        "label_names": adapter.label_names,
        "words": sorted(adapter.vocabulary) if adapter.vocabulary is not None else None,
        **(extra or {}),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


class TrainingSummary(TypedDict):
    """What ``attribution train-model`` prints: where the model is and how training went."""

    out: str
    examples: int
    steps: int
    seconds: float
    checkpoints: int
    lora_rank: int | None
    trainable_parameters: int
    steps_per_s: float
    final_loss: float


def train_to_dir(data_uri: str, cfg: TrainConfig, out: Path, *, checkpoints: int = 1,
                 read_options: dict[str, Any] | None = None) -> TrainingSummary:
    """Train ``cfg`` on the dataset at ``data_uri`` (logging progress) and save the model to
    ``out`` with its recipe and identity; the directory appears only once complete. With
    ``checkpoints > 1`` the EMA weights at the earlier of ``checkpoint_steps`` are saved as
    pipeline directories under ``out/checkpoints/step-NNNNNNN`` too (``model_checkpoints``
    lists them). Returns what ``attribution train-model`` prints."""
    data = load_training_data(data_uri, cfg, **(read_options or {}))  # read_options: image and id columns
    log.info("training on %d examples: %d steps of %d, %s conditioning", len(data.example_ids), cfg.steps,
             cfg.batch_size, cfg.conditioning)

    def progress(step: int, loss: float, elapsed: float) -> None:
        rate = step / elapsed
        log.info("step %(step)d/%(steps)d loss %(loss).4f  %(rate).2f steps/s  eta %(eta).0f s",
                 {"step": step, "steps": cfg.steps, "loss": loss, "rate": rate, "eta": (cfg.steps - step) / rate})

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def keep(step: int, snapshot: TrainedModel) -> None:
        save_model(snapshot, checkpoint_dir(tmp, step), {"data": data_uri, "examples": len(data.example_ids),
                                                         "columns": data.columns, "checkpoint_of": str(out),
                                                         "learning_rate": learning_rate_at(cfg, step)})

    model = train_model(data, cfg, progress=progress, checkpoint=keep, checkpoints=checkpoints)
    save_model(model, tmp, {"data": data_uri, "examples": len(data.example_ids), "columns": data.columns,
                            "identity": recipe_identity(cfg, model.base_fingerprint), "checkpoints": checkpoints,
                            "learning_rate": learning_rate_at(cfg, cfg.steps)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return TrainingSummary(out=str(out), examples=len(data.example_ids), steps=cfg.steps,
                           seconds=round(model.seconds, 1), checkpoints=checkpoints, lora_rank=cfg.lora_rank or None,
                           trainable_parameters=model.trainable_parameters,
                           steps_per_s=round(cfg.steps / model.seconds, 2),
                           final_loss=round(sum(model.losses[-50:]) / len(model.losses[-50:]), 5))

