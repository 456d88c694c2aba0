"""What ``evaluate`` tells the endpoint: the served index's 'general' aspect is answered by the
weighting LDS measured best for its basis (``weights.choice``), written into its weights
artifact, where ``learn-weights`` had left the choice of its validation queries (or none).

LDS is measured on the LDS universe model, trained by the ``subset_train`` recipe, with the
same featurize settings as the served index; its verdict on learned versus uniform weights
for a basis is the evidence the served index of that basis gets. The record says so
(``measured_on``)."""

from __future__ import annotations

import logging
from typing import Any

from attribution_core.answers import UNIFORM
from attribution_core.config import ProjectConfig
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import artifact_path
from attribution_core.weights.choice import record

log = logging.getLogger(__name__)

_BASIS_OF = {("loss", False): "tracin", ("loss", True): "trak", ("square", True): "dtrak", ("das", True): "das"}


def served_basis(measurement: str, kernel: bool) -> str | None:
    """The LDS basis an index of ``measurement`` scored with (or without) its kernel is; None
    for combinations the evaluation has no basis for."""
    return _BASIS_OF.get((measurement, kernel))


def apply_lds_choice(cfg: ProjectConfig, *, index: str, version: str, document: dict[str, Any],
                     table: dict[str, dict[str, Any]], lds_indexes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Record LDS's choice for the 'general' aspect of the served index's weights (``document``,
    the artifact ``weights.name`` of ``version``) and return it; None when its basis was not
    evaluated or it has no general weights."""
    basis = served_basis(cfg.featurize.measurement, cfg.weights.use_kernel)
    general = document.get("aspects", {}).get("general")
    if basis is None or basis not in table or general is None:
        return None
    served = table[basis]["served"]
    answered_by = "general" if served["weighting"] == "learned" else UNIFORM
    measured = lds_indexes.get(cfg.featurize.measurement, {})
    chosen = record(answered_by, "lds", {"general": served["gain"]}, basis=basis,
                    lds={"served": served["lds"], "ci": served["ci"]}, checkpoints=table[basis].get("checkpoints", 1),
                    measured_on={"index": measured.get("uri"), "version": measured.get("version"),
                                 "model": "the LDS universe model (subset_train recipe), same featurize settings"})
    if general.get("choice") != chosen or general.get("answered_by") != answered_by:
        general["answered_by"], general["choice"] = answered_by, chosen
        IndexStore(index).write_json(artifact_path(version, cfg.weights.name), document)
        log.info("general aspect of %s version %s answered by %s weights (LDS of %s: learned - uniform "
                 "%+.4f [%+.4f, %+.4f])", index, version, answered_by, basis, *served["gain"])
    return chosen
