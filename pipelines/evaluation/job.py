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
from attribution_core.evaluation.recall import RECALL_COLUMNS
from attribution_core.evaluation.report import render_report
from attribution_core.index.reader import load_index
from attribution_core.timing import Stopwatch
from pipelines.evaluation.aspects import run_recall
from pipelines.evaluation.lds import lds_recipe, run_lds
from pipelines.ray_runtime import ensure_ray
from pipelines.steps import build_index, ensure_weights, prepare

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateRequest:
    ray_address: str | None = None
    lds: bool = True
    recall: bool = True


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
    prepared = prepare(cfg, model=req.recall)  # LDS trains its own model; only Recall uses the main one
    lap("prepare")
    ensure_ray(req.ray_address)
    metrics: dict[str, Any] = {"lds": {}, f"recall_at_{ecfg.recall_k}": {}, "n_subsets": 0, "n_queries": 0}
    gallery: list[dict[str, Any]] = []
    info: dict[str, Any] = {"created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "data": cfg.data.uri, "subset_fraction": ecfg.subset_fraction, "recall_k": ecfg.recall_k,
                            "prepared": prepared}
    if req.recall:
        built = build_index(cfg, req.ray_address)
        lap("index")
        document, learned = ensure_weights(cfg, cfg.index.out, built["version"], ray_address=req.ray_address)
        lap("weights")
        info.update(index=built["uri"], version=built["version"], model=cfg.model.path, weights=cfg.weights.name,
                    weights_learned_now=learned is not None, aspects_learned=sorted(document["aspects"]),
                    answered_by={a: w.get("answered_by", a) for a, w in document["aspects"].items()},
                    validation={a: w["validation"] for a, w in document["aspects"].items() if w.get("validation")},
                    index_build={k: built.get(k) for k in ("uri", "version", "mode", "up_to_date", "featurized",
                                                           "rows", "errors", "rows_per_s", "actors")})
        recall = run_recall(cfg, load_index(cfg.index.out, built["version"]), document)
        metrics[f"recall_at_{ecfg.recall_k}"] = {a: {k: round(v, 4) for k, v in row.items()}
                                                 for a, row in recall["table"].items()}
        metrics[f"recall_heldout_at_{ecfg.recall_k}"] = {a: {k: round(v, 4) for k, v in row.items()}
                                                         for a, row in recall.get("heldout_table", {}).items()}
        metrics["recall_intervals"] = {"seen": recall.get("intervals", {}), "heldout": recall.get("heldout_intervals", {})}
        gallery = recall["gallery"]
        info.update(recall_queries=recall.get("queries", 0), recall_skipped=recall.get("skipped"),
                    recall_heldout_queries=recall.get("heldout_queries", 0))
        lap("recall")
    per_query: dict[str, Any] = {}
    if req.lds:
        result = run_lds(cfg, req.ray_address)
        metrics["lds"] = {b: {"uniform": round(r["uniform"], 4), "learned": round(r["learned"], 4),
                              "uniform_ci": [round(v, 4) for v in r["uniform_ci"]],
                              "learned_ci": [round(v, 4) for v in r["learned_ci"]],
                              "difference": round(r["difference"], 4),
                              "difference_ci": [round(v, 4) for v in r["difference_ci"]],
                              "weights": {g: round(w, 4) for g, w in r["weights"].items()},
                              **{k: r[k] for k in ("headroom", "damping", "kernel_choice") if k in r}}
                          for b, r in result["table"].items()}
        metrics.update(n_subsets=result["n_subsets"], n_queries=result["n_queries"])
        kinds = [q["kind"] for q in result["queries"]]
        info.update(n_train=result["n_train"], output=result["output"], recipe=result["recipe"],
                    query_mix=f"{kinds.count('generated')} generated, {kinds.count('heldout')} held-out real",
                    lds_indexes=result["indexes"], universe_model=result["universe_model"],
                    universe_model_trained_now=result["trained_universe_model"],
                    ground_truth=result["ground_truth"], lds_stage_seconds=result["stage_seconds"])
        per_query = {"queries": result["queries"], "lds": result["per_query"]}
        lap("lds")
    metrics["info"] = info
    metrics["stage_seconds"] = {**watch.seconds, "total": watch.total()}
    metrics["report"] = str(out / "report.html")
    _write(out / "lds_per_query.json", json.dumps(per_query, indent=2) + "\n")
    _write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    _write(out / "report.html", render_report(metrics, gallery))
    log.info("evaluation written to %s", out)
    return metrics


def summary_text(metrics: dict[str, Any]) -> str:
    """The tables of ``metrics`` as plain text."""
    lines = []
    if metrics["lds"]:
        lines.append(f"LDS ({metrics['n_subsets']} subsets, {metrics['n_queries']} queries; 95% bootstrap CI)")
        lines.append(f"  {'basis':<8} {'uniform':>8} {'CI':>17}  {'learned':>8} {'CI':>17}  {'learned-uniform (paired CI)':>28}")
        for basis, r in metrics["lds"].items():
            lines.append(f"  {basis:<8} {r['uniform']:>8.4f} [{r['uniform_ci'][0]:+.3f}, {r['uniform_ci'][1]:+.3f}]  "
                         f"{r['learned']:>8.4f} [{r['learned_ci'][0]:+.3f}, {r['learned_ci'][1]:+.3f}]  "
                         f"{r['difference']:>+8.4f} [{r['difference_ci'][0]:+.3f}, {r['difference_ci'][1]:+.3f}]")
        rooms = {b: r["headroom"] for b, r in metrics["lds"].items() if "headroom" in r}
        if rooms:
            lines.append("  headroom (evaluation only: weights fitted to LDS on half the subsets and queries, scored "
                         "on the other halves; uniform / learned / fitted on those halves)")
            for basis, h in rooms.items():
                lines.append(f"  {basis:<8} {h['uniform']:>8.4f} {h['learned']:>8.4f} {h['lds']:>8.4f} "
                             f"[{h['ci'][0]:+.3f}, {h['ci'][1]:+.3f}]")
        for basis, r in metrics["lds"].items():
            if r.get("damping"):
                chosen = r["kernel_choice"]
                lines.append(f"  {basis} by index.damping (uniform / learned at the index's {chosen['kernel']} kernel, "
                             f"damping {chosen['damping']:g}, {chosen['rule']}): " + "; ".join(
                                 f"{d['damping']:g}: {d['uniform']:.4f} / {d['learned']:.4f}" for d in r["damping"]))
    recall_key = next(k for k in metrics if k.startswith("recall_at_"))
    intervals = metrics.get("recall_intervals", {})
    for key, what, ci in ((recall_key, "queries prompted with training captions", intervals.get("seen", {})),
                          (recall_key.replace("recall_at_", "recall_heldout_at_"), "held-out attribute combinations",
                           intervals.get("heldout", {}))):
        if not metrics.get(key):
            continue
        columns = [c for c in RECALL_COLUMNS if any(c[0] in r for r in metrics[key].values())]
        lines.append(f"Recall@{recall_key.rsplit('_', 1)[1]}, {what} ({' / '.join(label for _, label in columns)})")
        for aspect, r in metrics[key].items():
            cells = " ".join(f"{r.get(k, float('nan')):>8.4f}" for k, _ in columns)
            lines.append(f"  {aspect:<11} {cells}")
            wins = [f"{k} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" for k, _ in columns
                    if (d := ci.get(aspect, {}).get(f"{k}-uniform"))]
            if wins:
                lines.append(f"  {'':<11} vs uniform (paired 95% CI): {'; '.join(wins)}")
    validation = metrics["info"].get("validation")
    if validation:
        lines.append("Validated choice (learn-weights' own queries, Recall@top_k): " + "; ".join(
            f"{a} answered by {metrics['info']['answered_by'][a]} ("
            + ", ".join(f"{w} {r:.3f}" for w, r in v["recall"].items()) + ")" for a, v in validation.items()))
    if not metrics[recall_key] and metrics["info"].get("recall_skipped"):
        lines.append(f"Recall not measured: {metrics['info']['recall_skipped']}")
    lines.append(f"report: {metrics['report']}")
    return "\n".join(lines)
