"""The evaluation report: one self-contained HTML file (inline CSS, images as data URLs)
with the LDS and Recall@K tables, the learned weights and a gallery of attributions."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from attribution_core.evaluation.recall import RECALL_COLUMNS

BASIS_LABEL = {"tracin": "TracIn (loss, K = I)", "trak": "TRAK (loss, kernel)", "dtrak": "D-TRAK (square, kernel)",
               "das": "DAS (output mean, kernel, residual scale)"}

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1d2330; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.muted { color: #667085; } table { border-collapse: collapse; margin: 8px 0 4px; }
th, td { border: 1px solid #d0d5dd; padding: 4px 10px; text-align: right; }
th { background: #f2f4f7; } td.name, th.name { text-align: left; }
td.best { font-weight: 700; background: #ecfdf3; }
.query { display: flex; gap: 18px; border-top: 1px solid #e4e7ec; padding: 12px 0; }
.query > .probe { width: 150px; flex: none; } .rankings { flex: 1; }
.ranking { display: flex; align-items: flex-start; gap: 6px; margin: 4px 0; }
.ranking .label { width: 90px; flex: none; font-weight: 600; padding-top: 20px; }
figure { margin: 0; width: 84px; text-align: center; font-size: 11px; }
img { width: 72px; height: 72px; image-rendering: pixelated; border: 3px solid #d0d5dd; border-radius: 4px; }
.probe img { width: 128px; height: 128px; border-color: #1d2330; }
img.all { border-color: #12b76a; } img.some { border-color: #fdb022; }
"""


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}".replace("-0.000", "0.000")


def _signed(value: Any) -> str:
    text = _num(value)
    return text if text == "n/a" or text.startswith("-") else f"+{text}"


def _img(data: bytes, css: str = "", alt: str = "") -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return (f'<img class="{css}" alt="{html.escape(alt)}" '
            f'src="data:{mime};base64,{base64.b64encode(data).decode()}">')


def lds_table(lds: dict[str, Any]) -> str:
    rows = ["<tr><th class=name>basis</th><th>uniform weights</th><th>95% CI</th><th>learned weights</th>"
            "<th>95% CI</th><th>learned &minus; uniform</th><th>paired 95% CI</th></tr>"]
    for basis, row in lds.items():
        u, w = row.get("uniform"), row.get("learned")
        better = "learned" if (u is not None and w is not None and w > u) else "uniform"
        ci = lambda name: f"[{_num(row[name][0])}, {_num(row[name][1])}]"  # noqa: E731
        rows.append(
            f"<tr><td class=name>{html.escape(BASIS_LABEL.get(basis, basis))}</td>"
            f"<td class='{'best' if better == 'uniform' else ''}'>{_num(u)}</td><td>{ci('uniform_ci')}</td>"
            f"<td class='{'best' if better == 'learned' else ''}'>{_num(w)}</td><td>{ci('learned_ci')}</td>"
            f"<td>{_signed(row.get('difference', (w or 0) - (u or 0)))}</td>"
            f"<td>{ci('difference_ci') if 'difference_ci' in row else 'n/a'}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def headroom_table(lds: dict[str, Any]) -> str:
    """LDS on the held-out halves: uniform, learned and weights fitted to LDS itself."""
    rows = ["<tr><th class=name>basis</th><th>uniform weights</th><th>learned weights</th>"
            "<th>fitted to LDS (headroom)</th><th>95% CI</th></tr>"]
    for basis, row in lds.items():
        h = row.get("headroom")
        if h:
            rows.append(f"<tr><td class=name>{html.escape(BASIS_LABEL.get(basis, basis))}</td><td>{_num(h['uniform'])}</td>"
                        f"<td>{_num(h['learned'])}</td><td>{_num(h['lds'])}</td>"
                        f"<td>[{_num(h['ci'][0])}, {_num(h['ci'][1])}]</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if len(rows) > 1 else ""


def damping_table(lds: dict[str, Any]) -> str:
    """LDS of each kernel basis by the kernel's damping."""
    swept = {b: row["damping"] for b, row in lds.items() if row.get("damping")}
    if not swept:
        return ""
    rows = ["<tr><th class=name>basis</th><th>index.damping</th><th>uniform weights</th>"
            "<th>learned weights (at the index's damping)</th></tr>"]
    for basis, entries in swept.items():
        chosen = lds[basis].get("kernel_choice") or {}

        def mark(d: float) -> str:
            return (f" (the index's: {html.escape(str(chosen.get('kernel')))} kernel, {html.escape(chosen.get('rule', 'fixed'))})"
                    if d == chosen.get("damping") else "")

        rows += [f"<tr><td class=name>{html.escape(BASIS_LABEL.get(basis, basis))}</td><td>{e['damping']:g}"
                 f"{mark(e['damping'])}</td><td>{_num(e['uniform'])}</td><td>{_num(e['learned'])}</td></tr>"
                 for e in entries]
    return "<table>" + "".join(rows) + "</table>"


def recall_table(recall: dict[str, dict[str, float]], intervals: dict[str, dict[str, Any]] | None = None) -> str:
    """Recall per aspect and column, with its 95 % interval over queries when known."""
    columns = [c for c in RECALL_COLUMNS if any(c[0] in row for row in recall.values())]
    head = "<tr><th class=name>attribute</th>" + "".join(f"<th>{label}</th>" for _, label in columns) + "</tr>"
    rows = [head]

    def interval(aspect: str, key: str) -> str:
        lo_hi = (intervals or {}).get(aspect, {}).get(key)
        return f"<br><small>[{_num(lo_hi[0])}, {_num(lo_hi[1])}]</small>" if lo_hi else ""

    for aspect, row in recall.items():
        best = max((v for v in row.values() if v is not None), default=None)
        cells = "".join(f"<td class='{'best' if row.get(key) == best else ''}'>{_num(row.get(key))}"
                        f"{interval(aspect, key)}</td>" for key, _ in columns)
        rows.append(f"<tr><td class=name>{html.escape(aspect)}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def weights_table(lds: dict[str, Any]) -> str:
    groups: list[str] = []
    for row in lds.values():
        groups += [g for g in row.get("weights", {}) if g not in groups]
    if not groups:
        return ""
    head = "<tr><th class=name>group</th>" + "".join(f"<th>{html.escape(b)}</th>" for b in lds) + "</tr>"
    rows = [head] + [f"<tr><td class=name>{html.escape(g)}</td>" +
                     "".join(f"<td>{_num(row.get('weights', {}).get(g))}</td>" for row in lds.values()) + "</tr>"
                     for g in groups]
    return "<table>" + "".join(rows) + "</table>"


def gallery_html(gallery: list[dict[str, Any]]) -> str:
    parts = []
    for q in gallery:
        asked = ", ".join(f"{k}: {v}" for k, v in q["attributes"].items())
        rankings = []
        for name, top in q["rankings"].items():
            figures = []
            for t in top:
                n_attr = len(q["attributes"])
                css = "all" if len(t["shares"]) == n_attr else ("some" if t["shares"] else "")
                title = f"{t['caption'] or t['example_id']} (shares: {', '.join(t['shares']) or 'nothing'})"
                figures.append(f"<figure title='{html.escape(title)}'>{_img(t['image'], css, title)}"
                               f"<figcaption>{t['score']:+.2e}</figcaption></figure>")
            rankings.append(f"<div class=ranking><div class=label>{html.escape(name)}</div>{''.join(figures)}</div>")
        parts.append(f"<div class=query><div class=probe>{_img(q['image'], '', q['prompt'] or '')}"
                     f"<div><b>{html.escape(q['prompt'] or '(unprompted)')}</b></div>"
                     f"<div class=muted>{html.escape(asked)}</div></div>"
                     f"<div class=rankings>{''.join(rankings)}</div></div>")
    return "".join(parts)


def render_report(metrics: dict[str, Any], gallery: list[dict[str, Any]]) -> str:
    """The whole report as one HTML string."""
    info = metrics.get("info", {})
    lds = metrics.get("lds", {})
    recall = metrics.get(f"recall_at_{info.get('recall_k', 10)}", {})  # the job keys it by evaluate.recall_k
    sections = [
        "<h1>Attribution evaluation</h1>",
        f"<p class=muted>index {html.escape(str(info.get('index', '')))} version "
        f"{html.escape(str(info.get('version', '')))} &middot; {html.escape(str(info.get('created_at', '')))}</p>",
    ]
    if lds:
        sections += [
            "<h2>Linear datamodeling score (LDS)</h2>",
            f"<p>{metrics.get('n_subsets')} random {info.get('subset_fraction', 0.5):.0%} subsets of "
            f"{info.get('n_train')} training examples, one model retrained on each; "
            f"{metrics.get('n_queries')} evaluation queries ({html.escape(str(info.get('query_mix', '')))}). "
            f"Model output: {html.escape(str(info.get('output', '')))}. Mean Spearman correlation over queries, "
            "95% bootstrap intervals over queries; the paired interval of learned &minus; uniform resamples "
            "the per-query differences. Higher is better.</p>",
            lds_table(lds),
            "<h3>Learned group weights (general)</h3>", weights_table(lds),
        ]
        if any("headroom" in row for row in lds.values()):
            sections += [
                "<h3>Headroom of group weighting</h3>",
                "<p>Evaluation only, never a default: group weights fitted to the retrained outputs on half of the "
                "subsets and half of the queries, LDS measured on the other halves, then the halves swapped. "
                "Uniform and learned weights are scored on the same halves (fewer subsets per query, so lower "
                "than the table above). A learned row far below the fitted one means the weight objective misses "
                "what the features hold.</p>", headroom_table(lds)]
        if any(row.get("damping") for row in lds.values()):
            sections += ["<h3>LDS by kernel damping</h3>",
                         "<p>The kernel K = (C + &lambda;I)<sup>&minus;1</sup> rebuilt with &lambda; = damping &times; "
                         "mean diagonal of C; the learned weights are those learned with the index's own damping.</p>",
                         damping_table(lds)]
    if recall:
        sections += [
            f"<h2>Aspect Recall@{info.get('recall_k', 10)}</h2>",
            f"<p>{info.get('recall_queries')} generated queries of known attributes; the share of each query's "
            f"top-{info.get('recall_k', 10)} training examples sharing the attribute.</p>",
            recall_table(recall, metrics.get("recall_intervals", {}).get("seen")),
        ]
        heldout = metrics.get(f"recall_heldout_at_{info.get('recall_k', 10)}", {})
        if heldout:
            sections += [
                f"<h3>Held-out attribute combinations</h3><p>{info.get('recall_heldout_queries')} queries prompted "
                "with combinations no training image has.</p>",
                recall_table(heldout, metrics.get("recall_intervals", {}).get("heldout"))]
    elif info.get("recall_skipped"):
        sections.append(f"<h2>Aspect Recall</h2><p class=muted>Not measured: {html.escape(info['recall_skipped'])}</p>")
    if gallery:
        sections += [
            "<h2>Gallery</h2>",
            "<p class=muted>Each generated query and its top training examples per weighting with scores. "
            "Border: green shares every attribute with the query, amber some, grey none.</p>",
            gallery_html(gallery),
        ]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>Attribution evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>")
