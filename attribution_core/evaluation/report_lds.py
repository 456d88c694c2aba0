"""The LDS part of the evaluation report: the bases table with what each would serve, the
learned weights, the headroom estimate, the damping sweep, the noise ceiling, the published
pipelines' reference rows and the featurizer's frontier (HTML fragments)."""

from __future__ import annotations

import html
import math
from typing import Any


def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}".replace("-0.000", "0.000")


def signed(value: Any) -> str:
    text = num(value)
    return text if text == "n/a" or text.startswith("-") else f"+{text}"


def interval(pair: Any) -> str:
    return f"[{num(pair[0])}, {num(pair[1])}]" if pair else "n/a"


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th{' class=name' if i == 0 else ''}>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{' class=name' if i == 0 else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def lds_table(lds: dict[str, Any]) -> str:
    """Uniform and learned weights per basis, their paired difference, and what LDS serves."""
    rows = []
    for basis, row in lds.items():
        served = row.get("served") or {}
        best = "learned" if served.get("weighting") == "learned" else "uniform"
        rows.append([
            f"<b>{html.escape(basis)}</b><br><small>{html.escape(row.get('label', ''))}</small>",
            f"<span class='{'best' if best == 'uniform' else ''}'>{num(row.get('uniform'))}</span> "
            f"<small>{interval(row.get('uniform_ci'))}</small>",
            f"<span class='{'best' if best == 'learned' else ''}'>{num(row.get('learned'))}</span> "
            f"<small>{interval(row.get('learned_ci'))}</small>",
            f"{signed(row.get('difference'))} <small>{interval(row.get('difference_ci'))}</small>",
            html.escape(served.get("weighting", "n/a")),
            (f"{num(served['cross_fitted']['lds'])} <small>{interval(served['cross_fitted']['ci'])}</small>"
             if served.get("cross_fitted") else "n/a"),
        ])
    return _table(["basis", "uniform weights", "learned weights", "learned &minus; uniform (paired)", "served",
                   "served, cross-fitted"], rows)


def weights_table(lds: dict[str, Any]) -> str:
    groups: list[str] = []
    for row in lds.values():
        groups += [g for g in row.get("weights", {}) if g not in groups]
    if not groups:
        return ""
    return _table(["group", *(html.escape(b) for b in lds)],
                  [[html.escape(g), *(num(row.get("weights", {}).get(g)) for row in lds.values())] for g in groups])


def headroom_table(lds: dict[str, Any]) -> str:
    """LDS on the held-out halves: uniform, learned and weights fitted to the ground truth."""
    rows = [[html.escape(basis), num(h["uniform"]), num(h["learned"]), num(h["lds"]), interval(h["ci"])]
            for basis, row in lds.items() if (h := row.get("headroom"))]
    return _table(["basis", "uniform weights", "learned weights", "fitted on the other halves", "95% CI"],
                  rows) if rows else ""


def damping_table(lds: dict[str, Any]) -> str:
    """LDS of each kernel basis by the kernel's damping."""
    rows = []
    for basis, row in lds.items():
        chosen = row.get("kernel_choice") or {}
        for e in row.get("damping") or []:
            mark = (f" (the index's: {html.escape(str(chosen.get('kernel')))} kernel, "
                    f"{html.escape(chosen.get('rule', 'fixed'))})" if e["damping"] == chosen.get("damping") else "")
            rows.append([html.escape(basis), f"{e['damping']:g}{mark}",
                         f"{num(e['uniform'])} <small>{interval(e.get('uniform_ci'))}</small>",
                         f"{num(e['learned'])} <small>{interval(e.get('learned_ci'))}</small>"])
    return _table(["basis", "index.damping", "uniform weights", "learned weights (at the index's damping)"],
                  rows) if rows else ""


def published_table(published: dict[str, Any]) -> str:
    """The published pipelines' rows, the paired difference of ours against them, and the paper's setting."""
    rows = []
    for row in published.values():
        versus = "<br>".join(f"{html.escape(b)} served &minus; it: {signed(d[0])} <small>{interval(d[1:])}</small>"
                             for b, d in row.get("versus", {}).items())
        paper = row.get("paper_setting")
        rows.append([
            html.escape(row["label"]), f"{num(row['lds'])} <small>{interval(row['ci'])}</small>",
            f"{', '.join(f'{d:g}' for d in row['dampings'])} <small>(published pick {row['oracle']['damping']:g}: "
            f"{num(row['oracle']['lds'])})</small>",
            f"{row['bytes_per_row']:,}",
            f"{row['featurize_s_per_row'] * 1000:.1f} / {row['ours_featurize_s_per_row'] * 1000:.1f}",
            versus or "n/a",
            (f"{signed(paper['difference'])} <small>{interval(paper['difference_ci'])}</small>" if paper else "n/a"),
        ])
    return _table(["reference", "LDS", "damping per half of the queries", "bytes / row",
                   "featurize ms / row: it / ours", "ours against it (paired)", "paper's setting: learned &minus; uniform"],
                  rows)


def frontier_table(frontier: dict[str, Any]) -> str:
    """LDS (uniform / served) per basis against bytes and featurize time per row."""
    frontier = frontier["settings"]
    bases = list(next(iter(frontier.values()))["bases"]) if frontier else []
    def against(row: dict[str, Any]) -> str:
        return "<br>".join(f"{html.escape(b)} &minus; {html.escape(key)}: {signed(d[0])} <small>{interval(d[1:])}</small>"
                           for b, r in row["bases"].items() for key, d in r.get("versus_published", {}).items()) or "n/a"

    rows = [[html.escape(setting), f"{row['bytes_per_row']:,}", f"{row['featurize_s_per_row'] * 1000:.1f}",
             *(f"{num(r['uniform'])} / {num(r['served_lds'])}<br><small>{interval(r['served_ci'])}</small>"
               for r in row["bases"].values()), against(row)]
            for setting, row in frontier.items()]
    return _table(["setting", "bytes / row", "featurize ms / row", *(f"{html.escape(b)}: uniform / served" for b in bases),
                   "served &minus; published (paired)"], rows)


def lds_sections(metrics: dict[str, Any], info: dict[str, Any]) -> list[str]:
    lds = metrics.get("lds", {})
    sections = [
        "<h2>Linear datamodeling score (LDS)</h2>",
        f"<p>{metrics.get('n_subsets')} random {info.get('subset_fraction', 0.5):.0%} subsets of "
        f"{info.get('n_train')} training examples, one model retrained on each; "
        f"{metrics.get('n_queries')} evaluation queries ({html.escape(str(info.get('query_mix', '')))}). "
        f"Model output: {html.escape(str(info.get('output', '')))}. Mean Spearman correlation over queries; every "
        "95% interval resamples queries and subsets (two-way bootstrap), paired intervals use the same draws. "
        "<i>Served</i>: uniform unless learned's paired interval lies above 0; <i>cross-fitted</i>: each half of "
        "the queries served by the choice the other half makes. Higher is better.</p>",
        lds_table(lds), "<h3>Learned group weights (general)</h3>", weights_table(lds)]
    ceiling = metrics.get("lds_noise_ceiling")
    if ceiling:
        sections.append(f"<h3>Noise ceiling</h3><p>The subsets retrained with training seed {ceiling['replica_seed']} "
                        f"give a second ground truth whose LDS against the first is {num(ceiling['agreement'])} "
                        f"{interval(ceiling['ci'])}: with independent retraining noise no attribution is expected "
                        f"above about {num(ceiling['ceiling'])}."
                        + (" Against the mean of both (ceiling about " + num(ceiling.get("ceiling_of_mean")) + ") the "
                           "served answers score: " + "; ".join(f"{html.escape(b)} {num(c['lds'])} {interval(c['ci'])}"
                                                                for b, c in ceiling["against_mean"].items())
                           if ceiling.get("against_mean") else "") + "</p>")
    if any("headroom" in row for row in lds.values()):
        sections += [
            "<h3>Headroom estimate of group weighting</h3>",
            "<p>Evaluation only, never a default, and an estimate rather than a bound: group weights fitted to the "
            "retrained outputs on half of the subsets and half of the queries, LDS measured on the other halves, then "
            "the halves swapped. Uniform and learned weights are scored on the same halves (fewer subsets per query, "
            "so lower than the table above).</p>", headroom_table(lds)]
    if any(row.get("damping") for row in lds.values()):
        sections += ["<h3>LDS by kernel damping</h3>",
                     "<p>The kernel K = (C + &lambda;I)<sup>&minus;1</sup> rebuilt with &lambda; = damping &times; "
                     "mean diagonal of C; the learned weights are those learned with the index's own damping.</p>",
                     damping_table(lds)]
    if metrics.get("lds_published"):
        sections += ["<h3>The published pipelines on the same ground truth</h3>",
                     "<p>The whole denoiser's gradient, one dense Gaussian projection, the full kernel at each damping "
                     "of the published grid; each half of the queries at the damping best on the other half (the "
                     "published code picks it on the test queries: shown beside). The paper's setting: per-group "
                     "weights learned with its objective on that projection, query side only.</p>",
                     published_table(metrics["lds_published"])]
    if metrics.get("lds_frontier"):
        sections += ["<h3>Featurizer frontier</h3>",
                     "<p>One featurize setting changed at a time (and an ensemble of checkpoints); LDS of uniform "
                     "weights and of the weighting LDS serves, against bytes per stored row and featurize time per "
                     "row.</p>", frontier_table(metrics["lds_frontier"])]
    return sections
