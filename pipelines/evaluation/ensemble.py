"""Checkpoint ensembles on the LDS universe: each checkpoint the universe model kept is indexed
on its own (``<out>/lds/checkpoints/step-N/index-<measurement>``) with the kernel structure
and damping the final model's index chose (no second choice per checkpoint), and the LDS
queries are featurized under each checkpoint's model. TracIn-CP sums the loss-gradient
products over the checkpoints weighted by their learning rates (Pruthi et al. 2020); the
kernel bases' ensembles (TRAK's) sum their scores with equal weight."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from attribution_core.config import ProjectConfig
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import LoadedIndex, load_index
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.checkpoints import model_checkpoints
from pipelines.evaluation.scoring import Member
from pipelines.index.job import IndexRequest, run_index
from pipelines.models import load_model_dir

log = logging.getLogger(__name__)


def checkpoint_members(bcfg: ProjectConfig, *, model_dir: str, final: Member, folder: Path, dataset: str,
                       batch: ExampleBatch, learning_rate_weighted: bool,
                       ray_address: str | None = None) -> list[Member]:
    """The members of a checkpoint ensemble of ``bcfg``'s measurement and featurize settings:
    every kept checkpoint's index (built here unless up to date) and query features, the
    final model's ``final`` last; coefficients are the checkpoints' learning rates relative
    to the final one's (``learning_rate_weighted``) or 1."""
    stats = final.index.manifest.stats
    fixed = dataclasses.replace(bcfg.index, kernel=stats["kernel"], damping_rule="fixed", damping=stats["damping"])
    found = model_checkpoints(model_dir)
    last_rate = found[-1][1]
    members = []
    for step, rate, path in found[:-1]:
        out = str(folder / "checkpoints" / f"step-{step:07d}" / f"index-{bcfg.featurize.measurement}")
        built = run_index(dataclasses.replace(bcfg, index=dataclasses.replace(fixed, out=out)),
                          IndexRequest(dataset=dataset, model=str(path), out=out, ray_address=ray_address))
        index: LoadedIndex = load_index(out, version=built["version"])
        features = version_featurizer(load_model_dir(str(path)), index.manifest, bcfg.featurize.max_rows_per_pass)
        members.append(Member(index, features.flat(batch), rate / last_rate if learning_rate_weighted else 1.0))
        log.info("checkpoint at step %d indexed (%s): coefficient %.3f", step, out, members[-1].coefficient)
    return [*members, dataclasses.replace(final, coefficient=1.0)]
