"""``metrics.json``'s LDS sections from ``run_lds``'s result, and every table as plain text
(what ``attribution evaluate`` and ``attribution demo`` print)."""

from __future__ import annotations

from typing import Any, TypedDict

from attribution_core.evaluation.lds_rows import rounded
from attribution_core.evaluation.recall import RECALL_COLUMNS
from attribution_core.evaluation.report_exemplars import exemplar_lines
from pipelines.evaluation.lds import LdsResult


class LdsSections(TypedDict, total=False):
    """``metrics.json``'s LDS sections (rounded; per-query values are in ``lds_per_query.json``)."""

    lds: dict[str, dict[str, Any]]
    lds_served: dict[str, dict[str, Any]]
    lds_noise_ceiling: dict[str, Any]
    lds_published: dict[str, dict[str, Any]]
    lds_frontier: dict[str, Any]


def lds_metrics(result: LdsResult, per_query: dict[str, Any]) -> LdsSections:
    """The LDS sections of ``metrics.json`` (``lds``, ``lds_served`` and, when measured,
    ``lds_noise_ceiling``, ``lds_published``, ``lds_frontier``); per-query values go to
    ``per_query`` (``lds_per_query.json``)."""
    out = LdsSections(lds={b: rounded(r) for b, r in result.table.items()},
                      lds_served={b: rounded(r["served"]) for b, r in result.table.items()})
    if result.noise_ceiling is not None:
        out["lds_noise_ceiling"] = rounded({k: v for k, v in result.noise_ceiling.items() if k != "per_query"})
        per_query["noise_ceiling"] = result.noise_ceiling["per_query"]
    if result.published is not None:
        out["lds_published"] = {}
        for key, row in result.published.items():
            entry = {k: v for k, v in row.items() if k != "per_query"}
            if "paper_setting" in entry:
                entry["paper_setting"] = {k: v for k, v in entry["paper_setting"].items() if k != "per_query"}
                per_query.setdefault("paper_setting", {})[key] = row["paper_setting"]["per_query"]
            out["lds_published"][key] = rounded(entry)
            per_query.setdefault("published", {})[key] = row["per_query"]
    if result.frontier is not None:
        out["lds_frontier"] = rounded(result.frontier, 6)
    return out


def _ci(pair: list[float]) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def _lds_lines(metrics: dict[str, Any]) -> list[str]:
    lines = [f"LDS ({metrics['n_subsets']} subsets, {metrics['n_queries']} queries; 95% intervals resample queries "
             "and subsets)"]
    lines.append(f"  {'basis':<8} {'uniform':>8} {'CI':>17}  {'learned':>8} {'CI':>17}  {'learned-uniform (paired CI)':>28}"
                 f"  served")
    for basis, r in metrics["lds"].items():
        served = r["served"]
        lines.append(f"  {basis:<8} {r['uniform']:>8.4f} {_ci(r['uniform_ci'])}  {r['learned']:>8.4f} "
                     f"{_ci(r['learned_ci'])}  {r['difference']:>+8.4f} {_ci(r['difference_ci'])}  {served['weighting']}")
    for basis, r in metrics["lds"].items():
        lines.append(f"  {basis}: {r['label']}")
    lines.append("  served: the weighting LDS says to serve (uniform unless learned's paired interval is above 0); "
                 "cross-fitted (each half of the queries served by the other half's choice):")
    for basis, r in metrics["lds"].items():
        crossed = r["served"]["cross_fitted"]
        lines.append(f"  {basis:<8} {r['served']['weighting']:>8} {r['served']['lds']:.4f}, cross-fitted "
                     f"{crossed['lds']:.4f} {_ci(crossed['ci'])} (served - uniform {crossed['difference']:+.4f} "
                     f"{_ci(crossed['difference_ci'])})")
    rooms = {b: r["headroom"] for b, r in metrics["lds"].items() if "headroom" in r}
    if rooms:
        lines.append("  headroom estimate (evaluation only; weights fitted to the ground truth on half the subsets and "
                     "queries, scored on the other halves; uniform / learned / fitted on those halves)")
        for basis, h in rooms.items():
            lines.append(f"  {basis:<8} {h['uniform']:>8.4f} {h['learned']:>8.4f} {h['lds']:>8.4f} {_ci(h['ci'])}")
    for basis, r in metrics["lds"].items():
        if r.get("damping"):
            chosen = r["kernel_choice"]
            lines.append(f"  {basis} by index.damping (uniform / learned at the index's {chosen['kernel']} kernel, "
                         f"damping {chosen['damping']:g}, {chosen['rule']}): " + "; ".join(
                             f"{d['damping']:g}: {d['uniform']:.4f} / {d['learned']:.4f}" for d in r["damping"]))
    ceiling = metrics.get("lds_noise_ceiling")
    if ceiling:
        lines.append(f"  noise ceiling: a second ground truth (training seed {ceiling['replica_seed']}) scores LDS "
                     f"{ceiling['agreement']:.4f} {_ci(ceiling['ci'])} against the first; no attribution is expected "
                     f"above about {ceiling['ceiling']:.4f}")
        if ceiling.get("against_mean"):
            lines.append(f"  against the mean of both ground truths (ceiling about {ceiling['ceiling_of_mean']:.4f}), "
                         "the served answers score: " + "; ".join(
                             f"{b} {c['lds']:.4f} {_ci(c['ci'])}" for b, c in ceiling["against_mean"].items()))
    return lines


def _reference_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for row in (metrics.get("lds_published") or {}).values():
        versus = "; ".join(f"{b} served - it {d[0]:+.4f} {_ci(d[1:])}" for b, d in row.get("versus", {}).items())
        lines.append(f"  {row['label']}: {row['lds']:.4f} {_ci(row['ci'])} (damping per half {row['dampings']}, "
                     f"the published pick on these queries {row['oracle']['damping']:g}: {row['oracle']['lds']:.4f}); "
                     f"{row['featurize_s_per_row'] * 1000:.1f} ms/row against ours "
                     f"{row['ours_featurize_s_per_row'] * 1000:.1f}"
                     + (f"; {versus}" if versus else ""))
        paper = row.get("paper_setting")
        if paper:
            lines.append(f"    the paper's setting (learned group weights on it): learned {paper['learned']:.4f} "
                         f"{_ci(paper['learned_ci'])} - uniform {paper['uniform']:.4f} = {paper['difference']:+.4f} "
                         f"{_ci(paper['difference_ci'])}")
    if lines:
        lines.insert(0, "Published pipelines on the same ground truth and queries (evaluation only):")
    frontier = metrics.get("lds_frontier")
    if frontier:
        lines.append("Featurizer frontier (LDS uniform / served per basis; bytes and featurize ms per row):")
        for setting, row in frontier["settings"].items():
            cells = ", ".join(f"{b} {r['uniform']:.3f}/{r['served_lds']:.3f}" for b, r in row["bases"].items())
            cost = f"{row['bytes_per_row']:>8,} B {row['featurize_s_per_row'] * 1000:>7.1f} ms"
            lines.append(f"  {setting:<18} {cost}  {cells}")
        chosen = frontier["selection"]
        if chosen.get("chosen"):
            lines.append(f"  selection ({chosen['basis']} served, first half of the queries, <= "
                         f"{chosen['max_bytes_per_row']:,.0f} B): {chosen['chosen']} "
                         f"{chosen['first_half'][chosen['chosen']]:.4f}; second half "
                         f"{chosen['second_half'][chosen['chosen']]:.4f} (default {chosen['second_half']['default']:.4f})")
        for setting in dict.fromkeys(["default", chosen.get("chosen") or "default"]):
            for basis, cell in frontier["settings"][setting]["bases"].items():
                for key, d in cell.get("versus_published", {}).items():
                    lines.append(f"  {setting} {basis} served - {key} as published: {d[0]:+.4f} {_ci(d[1:])}")
    return lines


def summary_text(metrics: dict[str, Any]) -> str:
    """The tables of ``metrics`` as plain text."""
    lines = exemplar_lines(metrics["exemplar_check"]) if metrics.get("exemplar_check") else []
    lines += _lds_lines(metrics) if metrics["lds"] else []
    lines += _reference_lines(metrics)
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
    info = metrics["info"]
    if info.get("answered_by"):
        lines.append("Served (what the endpoint answers each aspect with, and the evidence): " + "; ".join(
            f"{a} answered by {used} ({_evidence(info, a)})" for a, used in info["answered_by"].items()))
    if not metrics[recall_key] and info.get("recall_skipped"):
        lines.append(f"Recall not measured: {info['recall_skipped']}")
    lines.append(f"report: {metrics['report']}")
    return "\n".join(lines)


def _evidence(info: dict[str, Any], aspect: str) -> str:
    chosen = info.get("choices", {}).get(aspect) or {}
    if chosen.get("by") == "lds":
        gain = chosen["gains"]["general"]
        return f"LDS of {chosen['basis']}: learned - uniform {gain[0]:+.3f} {_ci(gain[1:])}"
    found = info.get("validation", {}).get(aspect)
    if chosen.get("by") == "validation" and found:
        return "validation Recall " + ", ".join(f"{w} {r:.3f}" for w, r in found["recall"].items())
    return "no evidence: " + ("uniform" if aspect == "general" else "its own weights")
