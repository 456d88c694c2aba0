"""Recall@K and mAP of the exemplar check, against direct definitions."""

import numpy as np
import pytest

from attribution_core.errors import InputError
from attribution_core.evaluation.exemplars import average_precision, exemplar_ranks, exemplar_table, recall_hits


def _brute_ap(scores: np.ndarray, is_exemplar: np.ndarray) -> float:
    # exemplars last among equal scores: sort by (score desc, exemplar after others)
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], bool(is_exemplar[j])))
    hits, precisions = 0, []
    for rank, j in enumerate(order, start=1):
        if is_exemplar[j]:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions))


def test_ranks_recall_and_ap_match_the_definitions_with_ties_against_the_exemplars():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(40, 30)).astype(float)  # many ties
    is_exemplar = np.zeros(30, dtype=bool)
    is_exemplar[[3, 7, 19]] = True
    ap = average_precision(scores, is_exemplar)
    np.testing.assert_allclose(ap, [_brute_ap(row, is_exemplar) for row in scores], atol=1e-12)
    ranks = exemplar_ranks(scores, is_exemplar)
    assert (np.diff(ranks, axis=1) > 0).all() and ranks.min() >= 1 and ranks.max() <= 30
    for k in (1, 5, 10):
        brute = [float(any(is_exemplar[j] for j in sorted(range(30), key=lambda j: (-row[j], bool(is_exemplar[j])))[:k]))
                 for row in scores]
        np.testing.assert_array_equal(recall_hits(scores, is_exemplar, k), brute)


def test_perfect_constant_and_reversed_rankings():
    is_exemplar = np.array([True, True, False, False, False])
    perfect = np.array([[5.0, 4.0, 1.0, 0.0, 0.5]])
    assert average_precision(perfect, is_exemplar)[0] == 1.0 and recall_hits(perfect, is_exemplar, 1)[0] == 1.0
    constant = np.zeros((1, 5))  # ties go against the exemplars: ranked 4 and 5
    assert average_precision(constant, is_exemplar)[0] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert recall_hits(constant, is_exemplar, 3)[0] == 0.0
    assert exemplar_ranks(-perfect, is_exemplar).tolist() == [[4, 5]]


def test_table_pairs_every_column_with_uniform():
    rng = np.random.default_rng(1)
    is_exemplar = np.zeros(50, dtype=bool)
    is_exemplar[:4] = True
    good = rng.normal(size=(60, 50)) + 3 * is_exemplar
    table = exemplar_table({"uniform": rng.normal(size=(60, 50)), "learned": good}, is_exemplar, 10, resamples=500)
    assert table["learned"]["recall"] > table["uniform"]["recall"] and "recall_vs" not in table["uniform"]
    mean, lo, hi = table["learned"]["map_vs"]
    assert lo <= mean <= hi and lo > 0  # a real gain is seen as one
    assert table["learned"]["recall_ci"][0] <= table["learned"]["recall"] <= table["learned"]["recall_ci"][1]


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="exemplars and other rows"):
        average_precision(np.zeros((2, 3)), np.zeros(3, dtype=bool))
    with pytest.raises(InputError, match="candidates"):
        average_precision(np.zeros((2, 3)), np.ones(4, dtype=bool))
    with pytest.raises(InputError, match="k must be"):
        recall_hits(np.zeros((2, 3)), np.array([True, False, False]), 0)
    with pytest.raises(InputError, match="same queries"):
        exemplar_table({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, np.array([True, False, False]), 1)


def test_the_check_reads_as_text_and_html_with_every_column_in_order():
    from attribution_core.evaluation.exemplars import summarize
    from attribution_core.evaluation.report_exemplars import exemplar_columns, exemplar_lines, exemplar_section

    rng = np.random.default_rng(0)
    values = {name: ((rng.random(8) < p).astype(float), rng.random(8)) for name, p in (
        ("uniform", 0.9), ("general", 0.8), ("style", 1.0), ("served", 1.0), ("contrastive", 0.5),
        ("basis:trak", 0.7), ("pixel_knn", 0.2), ("control", 0.0))}
    table = {"style": summarize(values, resamples=100)}
    assert [k for k, _ in exemplar_columns(table["style"])] == [
        "served", "general", "style", "uniform", "contrastive", "basis:trak", "pixel_knn", "control"]
    check = {"k": 10, "sets": [{"size": 8}], "distractors": 100, "queries_per_set": 8, "prompt": "a sks",
             "table": table, "served_by": {"style": "style"}}
    text = "\n".join(exemplar_lines(check))
    assert "1 set(s) of 8 exemplars, each among 100 training rows" in text and "prompted 'a sks'" in text
    assert "style sets (8 queries; served answer: style)" in text and "trak basis, uniform" in text
    assert "In one line: the served answers find an exemplar in their top 10 for 100% of queries" in text
    assert "control 0.00" in text
    gallery = [{"name": "style-dotted", "kind": "style", "prompt": "a sks", "image": b"q", "exemplars": [b"e"],
                "first_exemplar_rank": 2, "served_by": "style",
                "top": [{"image": b"x", "exemplar": False, "score": 1.0, "caption": "a dotted ring"},
                        {"image": b"e", "exemplar": True, "score": 0.5, "caption": None}]}]
    html = "".join(exemplar_section(check, gallery, lambda data, css, alt: f"<img class='{css}'>"))
    assert "<th>style</th>" in html and "control: no customization" in html and "first exemplar at rank 2" in html
    assert html.count("<img class='all'>") == 1  # the exemplar among the top candidates is marked
