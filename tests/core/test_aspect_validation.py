"""The weighting that answers an aspect: chosen by Recall on validation queries, recorded,
used by the endpoint's searchers and shown in the Recall table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.evaluation.recall import aspect_recall_table
from attribution_core.features.groups import GroupLayout, GroupSpec
from attribution_core.index.served import MissingWeightsError, ServedIndex
from attribution_core.weights.validation import candidates, choose, validate


def test_candidates_and_ties_prefer_the_aspects_own_weights():
    assert candidates("subject", ["general", "subject", "style"]) == ["subject", "general", "uniform"]
    assert candidates("style", ["style"]) == ["style", "uniform"]
    order = ["subject", "general", "uniform"]
    assert choose({"subject": 0.4, "general": 0.5, "uniform": 0.45}, order) == "general"
    assert choose({"subject": 0.5, "general": 0.5, "uniform": 0.5}, order) == "subject"
    assert choose({"subject": 0.2, "general": 0.3, "uniform": 0.3}, order) == "general"


def test_validate_counts_the_asked_value_in_each_top_k():
    values = {"subject": {"a": "ring", "b": "ring", "c": "cross", "d": "cross"}}
    names = ["general", "subject", "uniform"]
    top = np.array([  # [Q=2, C=3, k=2]
        [["a", "c"], ["a", "b"], ["c", "d"]],  # query 0 asks for ring
        [["c", "a"], ["d", "c"], ["c", ""]],  # query 1 asks for cross; uniform's list is short
    ], dtype=object)
    found = validate(top, names, {"subject": ["ring", "cross"]}, values, resamples=200)["subject"]
    assert found["recall"] == {"subject": 1.0, "general": 0.5, "uniform": 0.5}
    assert found["answered_by"] == "subject" and found["queries"] == 2 and found["k"] == 2
    lo, hi = found["intervals"]["general"]
    assert lo <= 0.5 <= hi
    with pytest.raises(ValueError, match="2 validation queries but 1 subject values"):
        validate(top, names, {"subject": ["ring"]}, values)


def _layout() -> GroupLayout:
    return GroupLayout(groups=(GroupSpec("a", 0, 2, ()), GroupSpec("b", 2, 2, ())), layers=(), k_in=1, k_out=1)


def test_the_recall_table_repeats_the_validated_column():
    rng = np.random.default_rng(0)
    train, queries = torch.from_numpy(rng.normal(size=(40, 4)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(12, 4)).astype(np.float32))
    truth, asked = list(rng.integers(0, 3, 40)), list(rng.integers(0, 3, 12))
    aspects = {"general": {"weights": [0.5, 0.5]}, "subject": {"weights": [0.9, 0.1]}}
    weights = {"groups": ["a", "b"], "aspects": aspects}
    plain = aspect_recall_table(queries, _layout(), None, train, weights, {"subject": asked}, {"subject": truth}, k=5)
    assert "validated" not in plain["subject"]  # unvalidated weights: no such column
    for chosen, column in (("general", "general"), ("subject", "aspect"), ("uniform", "uniform")):
        aspects["subject"] |= {"answered_by": chosen, "validation": {"recall": {}}}
        table = aspect_recall_table(queries, _layout(), None, train, weights, {"subject": asked}, {"subject": truth}, k=5)
        assert table["subject"]["validated"] == table["subject"][column]


def test_searchers_answer_an_aspect_with_its_validated_weighting():
    def served(aspects):
        return ServedIndex(uri="mem://i", manifest={"version": "v1"}, layout=_layout(), kernel=[],
                           weights={"groups": ["a", "b"], "aspects": aspects} if aspects is not None else None,
                           weights_source=None, weights_name="learned", example_ids=[], uris=[], captions=[],
                           search_index=None, part=0, parts=1, load_seconds=0.0)

    index = served({"general": {"weights": [0.5, 0.5]}, "subject": {"weights": [0.9, 0.1], "answered_by": "general"},
                    "style": {"weights": [0.1, 0.9], "answered_by": "style"},
                    "background": {"weights": [0.2, 0.8], "answered_by": "uniform"}})
    assert index.resolve_aspects(("subject", "style", "background", "general"), False) == {
        "subject": "general", "style": "style", "background": "uniform", "general": "general"}
    # Weights without the choice (written before it existed) answer with their own weights.
    assert served({"subject": {"weights": [0.9, 0.1]}}).resolve_aspects(("subject",), False) == {"subject": "subject"}
    # A choice naming weights this artifact lacks is not followed.
    assert served({"subject": {"weights": [0.9, 0.1], "answered_by": "general"}}).resolve_aspects(
        ("subject",), False) == {"subject": "subject"}
    with pytest.raises(MissingWeightsError):
        served(None).resolve_aspects(("subject",), False)
