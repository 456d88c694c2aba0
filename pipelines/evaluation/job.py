"""``attribution evaluate``: the numbers that say whether learned weights attribute better.

Runs (or finds done) the main job's steps — dataset, model, index, learned weights — then
measures, side by side in one run, LDS of TracIn / TRAK / D-TRAK with uniform and learned
weights (``lds.py``) and aspect Recall@K with aspect / general / uniform weights and pixel
kNN (``aspects.py``), and writes ``metrics.json``, ``lds_per_query.json`` and a
self-contained ``report.html`` under ``evaluate.out``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any

from attribution_core.config import ProjectConfig
from attribution_core.errors import ConfigError
from attribution_core.evaluation.lds_rows import rounded
from attribution_core.evaluation.report import render_report
from attribution_core.index.reader import load_index
from attribution_core.timing import Stopwatch
from attribution_core.weights.artifact import unvalidated_choice
from pipelines.evaluation.aspects import run_recall
from pipelines.evaluation.choice import apply_lds_choice
from pipelines.evaluation.exemplars import plan_exemplars, run_exemplars
from pipelines.evaluation.lds import run_lds
from pipelines.evaluation.summary import lds_metrics
from pipelines.evaluation.universe import lds_recipe
from pipelines.ray_runtime import ensure_ray
from pipelines.steps import build_index, ensure_weights, prepare

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateRequest:
    ray_address: str | None = None
    lds: bool = True
    recall: bool = True
    exemplars: bool = True


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)  # readers never see half a file


def evaluate(cfg: ProjectConfig, req: EvaluateRequest = EvaluateRequest()) -> dict[str, Any]:
    ecfg = cfg.evaluate
    out = Path(ecfg.out)
    if "://" in ecfg.out:
        raise ConfigError(f"evaluate.out must be a local folder (it caches retrained models' outputs), got {ecfg.out!r}")
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch(digits=1)
    lap = watch.lap
    if req.lds:
        lds_recipe(cfg)  # a model brought without its recipe cannot be retrained: say so before any work
    exemplars = req.exemplars and ecfg.exemplars is not None
    served = req.recall or exemplars  # the parts measured on the main model, its index and weights
    prepared = prepare(cfg, model=served)  # LDS trains its own model
    plan = plan_exemplars(cfg) if exemplars else None  # sets that cannot be drawn stop the run here
    lap("prepare")
    ensure_ray(req.ray_address)
    metrics: dict[str, Any] = {"lds": {}, f"recall_at_{ecfg.recall_k}": {}, "n_subsets": 0, "n_queries": 0}
    gallery: list[dict[str, Any]] = []
    gallery_sets: list[dict[str, Any]] = []
    info: dict[str, Any] = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "data": cfg.data.uri, "subset_fraction": ecfg.subset_fraction, "recall_k": ecfg.recall_k,
                            "prepared": prepared}
    if served:
        built = build_index(cfg, req.ray_address)
        lap("index")
        document, learned = ensure_weights(cfg, cfg.index.out, built["version"], ray_address=req.ray_address)
        lap("weights")
        info.update(index=built["uri"], version=built["version"], model=cfg.model.path, weights=cfg.weights.name,
                    weights_learned_now=learned is not None, aspects_learned=sorted(document["aspects"]),
                    validation={a: w["validation"] for a, w in document["aspects"].items() if w.get("validation")},
                    index_build={k: built.get(k) for k in ("uri", "version", "mode", "up_to_date", "featurized",
                                                           "rows", "errors", "rows_per_s", "actors")})
    if req.recall:
        recall = run_recall(cfg, load_index(cfg.index.out, version=built["version"]), document)
        metrics[f"recall_at_{ecfg.recall_k}"] = {a: {k: round(v, 4) for k, v in row.items()}
                                                 for a, row in recall.table.items()}
        metrics[f"recall_heldout_at_{ecfg.recall_k}"] = {a: {k: round(v, 4) for k, v in row.items()}
                                                         for a, row in recall.heldout_table.items()}
        metrics["recall_intervals"] = {"seen": recall.intervals, "heldout": recall.heldout_intervals}
        gallery = recall.gallery
        info.update(recall_queries=recall.queries, recall_skipped=recall.skipped,
                    recall_heldout_queries=recall.heldout_queries)
        lap("recall")
    per_query: dict[str, Any] = {}
    if req.lds:
        result = run_lds(cfg, req.ray_address)
        per_query = {"queries": result.queries, "lds": result.per_query}
        metrics.update(lds_metrics(result, per_query))
        metrics.update(n_subsets=result.n_subsets, n_queries=result.n_queries)
        kinds = [q["kind"] for q in result.queries]
        info.update(n_train=result.n_train, output=result.output, recipe=result.recipe,
                    query_mix=f"{kinds.count('generated')} generated, {kinds.count('heldout')} held-out real",
                    lds_indexes=result.indexes, universe_model=result.universe_model,
                    universe_model_trained_now=result.trained_universe_model,
                    ground_truth=result.ground_truth, lds_stage_seconds=result.stage_seconds)
        if served:  # the served index's general aspect follows LDS's verdict for its basis
            apply_lds_choice(cfg, index=built["uri"], version=built["version"], document=document,
                             table=result.table, lds_indexes=result.indexes)
        lap("lds")
    if exemplars:  # after LDS, which may change what answers 'general'
        check = run_exemplars(cfg, load_index(cfg.index.out, version=built["version"]), document, plan)
        gallery_sets = check["gallery"]  # to the report; metrics.json keeps the numbers
        metrics["exemplar_check"] = rounded({k: v for k, v in check.items() if k != "gallery"})
        lap("exemplars")
    if served:  # what the endpoint answers each aspect with, and the evidence it was chosen by
        info.update(answered_by={a: w.get("answered_by", unvalidated_choice(a)) for a, w in document["aspects"].items()},
                    choices={a: rounded(w.get("choice") or {"by": "unvalidated"}) for a, w in document["aspects"].items()})
    metrics["info"] = info
    metrics["stage_seconds"] = {**watch.seconds, "total": watch.total()}
    metrics["report"] = str(out / "report.html")
    _write(out / "lds_per_query.json", json.dumps(per_query, indent=2) + "\n")
    _write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _write(out / "report.html", render_report(metrics, gallery, gallery_sets))
    log.info("evaluation written to %s", out)
    return metrics
