"""The evaluation report: one self-contained HTML file (inline CSS, images as data URLs)
with the LDS and Recall@K tables, the learned weights and a gallery of attributions."""

from __future__ import annotations

import base64
import html
from typing import Any

from attribution_core.evaluation.recall import RECALL_COLUMNS
from attribution_core.evaluation.report_exemplars import exemplar_section
from attribution_core.evaluation.report_lds import lds_sections, num

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


def _img(data: bytes, css: str = "", alt: str = "") -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return (f'<img class="{css}" alt="{html.escape(alt)}" '
            f'src="data:{mime};base64,{base64.b64encode(data).decode()}">')


def recall_table(recall: dict[str, dict[str, float]], intervals: dict[str, dict[str, Any]] | None = None) -> str:
    """Recall per aspect and column, with its 95 % interval over queries when known."""
    columns = [c for c in RECALL_COLUMNS if any(c[0] in row for row in recall.values())]
    head = "<tr><th class=name>attribute</th>" + "".join(f"<th>{label}</th>" for _, label in columns) + "</tr>"
    rows = [head]

    def interval(aspect: str, key: str) -> str:
        lo_hi = (intervals or {}).get(aspect, {}).get(key)
        return f"<br><small>[{num(lo_hi[0])}, {num(lo_hi[1])}]</small>" if lo_hi else ""

    for aspect, row in recall.items():
        best = max((v for v in row.values() if v is not None), default=None)
        cells = "".join(f"<td class='{'best' if row.get(key) == best else ''}'>{num(row.get(key))}"
                        f"{interval(aspect, key)}</td>" for key, _ in columns)
        rows.append(f"<tr><td class=name>{html.escape(aspect)}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def served_table(info: dict[str, Any]) -> str:
    """Per aspect of the served index: the weighting that answers it and the evidence."""
    rows = ["<tr><th class=name>aspect</th><th>answered by</th><th>evidence</th></tr>"]
    for aspect, used in info["answered_by"].items():
        chosen = (info.get("choices") or {}).get(aspect) or {}
        by = chosen.get("by", "unvalidated")
        gains = "; ".join(f"{html.escape(w)} &minus; uniform {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]"
                          for w, g in (chosen.get("gains") or {}).items())
        where = f"LDS of {chosen.get('basis')}" if by == "lds" else by
        rows.append(f"<tr><td class=name>{html.escape(aspect)}</td><td>{html.escape(used)}</td>"
                    f"<td class=name>{html.escape(where)}{': ' + gains if gains else ''}</td></tr>")
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


def render_report(metrics: dict[str, Any], gallery: list[dict[str, Any]],
                  exemplar_gallery: list[dict[str, Any]] | None = None) -> str:
    """The whole report as one HTML string (``exemplar_gallery``: a row per exemplar set)."""
    info = metrics.get("info", {})
    lds = metrics.get("lds", {})
    recall = metrics.get(f"recall_at_{info.get('recall_k', 10)}", {})  # the job keys it by evaluate.recall_k
    sections = [
        "<h1>Attribution evaluation</h1>",
        f"<p class=muted>index {html.escape(str(info.get('index', '')))} version "
        f"{html.escape(str(info.get('version', '')))} &middot; {html.escape(str(info.get('created_at', '')))}</p>",
    ]
    if info.get("answered_by"):
        sections += ["<h2>What the endpoint serves</h2>", served_table(info)]
    if metrics.get("exemplar_check"):
        sections += exemplar_section(metrics["exemplar_check"], exemplar_gallery or [], _img)
    if lds:
        sections += lds_sections(metrics, info)
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
