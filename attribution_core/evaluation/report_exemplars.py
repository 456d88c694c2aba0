"""The exemplar check in words and HTML: its table (per set kind, every column, Recall@K and
mAP with intervals) for ``attribution evaluate`` / ``demo`` and the report, and the report's
gallery row per set (a query, the exemplars, the served answer's top candidates)."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

FIXED_COLUMNS = (("served", "served answer"), ("general", "general weights"), ("uniform", "uniform weights"),
                 ("contrastive", "contrastive query"), ("pixel_knn", "pixel kNN"),
                 ("control", "control: no customization"))
"""Columns in the order tables show them, each aspect's own weights after 'general'."""


def exemplar_columns(table: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """``(key, label)`` of the columns present in a kind's table, in display order."""
    fixed = dict(FIXED_COLUMNS)
    bases = [(c, f"{c.split(':', 1)[1]} basis, uniform") for c in table if c.startswith("basis:")]
    aspects = [(c, f"{c} weights") for c in table if c not in fixed and not c.startswith("basis:")]
    ordered = [(k, v) for k, v in FIXED_COLUMNS[:2] if k in table] + aspects
    return ordered + [(k, v) for k, v in FIXED_COLUMNS[2:4] if k in table] + bases + [
        (k, v) for k, v in FIXED_COLUMNS[4:] if k in table]


def _cell(row: dict[str, Any], fmt: Callable[[float], str]) -> tuple[str, str]:
    recall = f"{fmt(row['recall'])} [{fmt(row['recall_ci'][0])}, {fmt(row['recall_ci'][1])}]"
    return recall, f"{fmt(row['map'])} [{fmt(row['map_ci'][0])}, {fmt(row['map_ci'][1])}]"


def exemplar_lines(check: dict[str, Any]) -> list[str]:
    """The check as plain text: one block per set kind (and ``all``)."""
    k, fmt = check["k"], (lambda v: f"{v:.2f}")
    lines = [f"Exemplar check (attribution by customization): {len(check['sets'])} set(s) of "
             f"{'/'.join(str(s['size']) for s in check['sets'])} exemplars, each among {check['distractors']} "
             f"training rows, {check['queries_per_set']} queries per set"
             + (f" prompted '{check['prompt']}'" if check.get("prompt") else "")
             + f"; Recall@{k} and mAP with 95% intervals over queries"]
    for kind, table in check["table"].items():
        served = check["served_by"].get(kind)
        lines.append(f"  {kind} sets ({next(iter(table.values()))['queries']} queries"
                     + (f"; served answer: {served}" if served else "") + ")")
        for key, label in exemplar_columns(table):
            recall, ap = _cell(table[key], fmt)
            vs, map_vs = table[key].get("recall_vs"), table[key].get("map_vs")
            delta = (f"  vs uniform R {vs[0]:+.2f} [{vs[1]:+.2f}, {vs[2]:+.2f}], mAP {map_vs[0]:+.2f} "
                     f"[{map_vs[1]:+.2f}, {map_vs[2]:+.2f}]" if vs and map_vs else "")
            lines.append(f"    {label:<28} R@{k} {recall:<19} mAP {ap:<19}{delta}")
    overall = check["table"].get("all") or next(iter(check["table"].values()))
    if "served" in overall:
        served = overall["served"]
        others = ", ".join(f"{label} {overall[key]['recall']:.2f}" for key, label in (
            ("control", "control"), ("pixel_knn", "pixel kNN")) if key in overall)
        lines.append(f"  In one line: the served answers find an exemplar in their top {k} for "
                     f"{served['recall']:.0%} of queries [{served['recall_ci'][0]:.0%}, {served['recall_ci'][1]:.0%}]"
                     f" ({others})")
    return lines


def exemplar_section(check: dict[str, Any], gallery: list[dict[str, Any]],
                     image: Callable[[bytes, str, str], str]) -> list[str]:
    """The report's section: the table, then one gallery row per set (``image(data, css, alt)``
    renders a picture; an exemplar among the top candidates is bordered green)."""
    k = check["k"]
    kinds = list(check["table"])
    columns: list[tuple[str, str]] = []
    for kind in kinds:
        columns += [c for c in exemplar_columns(check["table"][kind]) if c not in columns]
    head = "".join(f"<th>{html.escape(kind)}</th>" for kind in kinds)
    rows = [f"<tr><th class=name>Recall@{k} / mAP</th>{head}</tr>"]
    for key, label in columns:
        cells = []
        for kind in kinds:
            row = check["table"][kind].get(key)
            if row is None:
                cells.append("<td></td>")
                continue
            recall, ap = _cell(row, lambda v: f"{v:.2f}")
            cells.append(f"<td>{recall}<br><span class=muted>mAP {ap}</span></td>")
        rows.append(f"<tr><td class=name>{html.escape(label)}</td>{''.join(cells)}</tr>")
    parts = ["<h2>Exemplar check: attribution by customization</h2>",
             f"<p>The model fine-tuned briefly on each exemplar set under the prompt "
             f"<b>{html.escape(check.get('prompt') or 'of its labels')}</b>; its images for that prompt were caused "
             f"by the exemplars. A hit: an exemplar among a query's top {k} of the exemplars and "
             f"{check['distractors']} training rows. The control scores the uncustomized model's images for the same "
             "prompt against the rows as indexed.</p>", "<table>" + "".join(rows) + "</table>"]
    for s in gallery:
        exemplars = "".join(f"<figure>{image(data, '', 'exemplar')}</figure>" for data in s["exemplars"])
        top = "".join(
            f"<figure title='{html.escape(t['caption'] or 'exemplar')}'>"
            f"{image(t['image'], 'all' if t['exemplar'] else '', t['caption'] or 'exemplar')}"
            f"<figcaption>{t['score']:+.2e}</figcaption></figure>" for t in s["top"])
        parts.append(
            f"<div class=query><div class=probe>{image(s['image'], '', s['prompt'] or '')}"
            f"<div><b>{html.escape(s['name'])}</b> ({html.escape(s['kind'])})</div>"
            f"<div class=muted>first exemplar at rank {s['first_exemplar_rank']}</div></div><div class=rankings>"
            f"<div class=ranking><div class=label>exemplars</div>{exemplars}</div>"
            f"<div class=ranking><div class=label>served: {html.escape(s['served_by'])}</div>{top}</div></div></div>")
    return parts
