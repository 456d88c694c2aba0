"""The weighting that answers an aspect: chosen by Recall on validation queries, recorded,
used by the endpoint's searchers and shown in the Recall table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.evaluation.recall import aspect_recall_table
from attribution_core.features.groups import GroupLayout, GroupSpec
from attribution_core.errors import MissingWeightsError
from attribution_core.index.manifest import IndexManifest, ModelRecord
from attribution_core.weights.served import ServedIndex
from attribution_core.weights.artifact import unvalidated_choice
from attribution_core.weights.choice import candidates, choose
from attribution_core.weights.validation import validate


def test_uniform_answers_unless_a_learned_weighting_is_significantly_better():
    assert candidates("subject", ["general", "subject", "style"]) == ["subject", "general", "uniform"]
    assert candidates("style", ["style"]) == ["style", "uniform"]
    assert candidates("general", ["general", "style"]) == ["general", "uniform"]
    order = ["subject", "general", "uniform"]
    # gains over uniform: (mean, lo, hi) of the paired interval
    assert choose({"subject": (0.10, 0.02, 0.2), "general": (0.15, -0.01, 0.3)}, order) == "subject"
    assert choose({"subject": (0.10, 0.02, 0.2), "general": (0.15, 0.01, 0.3)}, order) == "general"
    assert choose({"subject": (0.10, 0.02, 0.2), "general": (0.10, 0.05, 0.3)}, order) == "subject"  # tie: own first
    assert choose({"subject": (0.30, 0.00, 0.6), "general": (-0.1, -0.2, 0.0)}, order) == "uniform"
    assert choose({}, ["general", "uniform"]) == "uniform"
    assert unvalidated_choice("general") == "uniform" and unvalidated_choice("style") == "style"


def test_validate_counts_the_asked_value_in_each_top_k():
    values = {"subject": {"a": "ring", "b": "ring", "c": "cross", "d": "cross"}}
    names = ["general", "subject", "uniform"]
    top = np.array([  # [Q=2, C=3, k=2]
        [["a", "c"], ["a", "b"], ["c", "d"]],  # query 0 asks for ring
        [["c", "a"], ["d", "c"], ["a", ""]],  # query 1 asks for cross; uniform's list is short
    ], dtype=object)
    found = validate(top, names, {"subject": ["ring", "cross"]}, values, resamples=200)["subject"]
    assert found["recall"] == {"subject": 1.0, "general": 0.5, "uniform": 0.0}
    # both clear uniform on every query; the larger gain answers
    assert found["gains"] == {"subject": [1.0, 1.0, 1.0], "general": [0.5, 0.5, 0.5]}
    assert found["answered_by"] == "subject" and found["by"] == "validation" and found["queries"] == 2
    assert found["k"] == 2
    lo, hi = found["intervals"]["general"]
    assert lo <= 0.5 <= hi
    with pytest.raises(ValueError, match="2 validation queries but 1 subject values"):
        validate(top, names, {"subject": ["ring"]}, values)


def test_a_general_query_asks_for_every_attribute_at_once():
    """A general validation query's hit is the share of its attribute values a training
    example has; uniform answers when general weights do not beat it clearly."""
    values = {"general": {"a": ("ring", "filled"), "b": ("ring", "dotted"), "c": ("cross", "dotted")}}
    top = np.array([[["a", "b"], ["c", "b"]], [["b", "a"], ["c", "a"]]], dtype=object)  # [Q=2, C=2 (general, uniform), k=2]
    found = validate(top, ["general", "uniform"], {"general": [("ring", "filled"), ("ring", "dotted")]}, values,
                     resamples=200)["general"]
    # query 0: a 1.0, b 0.5 | c 0.0, b 0.5; query 1: b 1.0, a 0.5 | c 0.5, a 0.5
    assert found["recall"] == {"general": 0.75, "uniform": 0.375}
    assert found["answered_by"] == "general"
    tied = validate(top[:, ::-1], ["general", "uniform"], {"general": [("ring", "filled"), ("ring", "dotted")]}, values,
                    resamples=200)["general"]
    assert tied["recall"] == {"general": 0.375, "uniform": 0.75} and tied["answered_by"] == "uniform"


def _layout() -> GroupLayout:
    return GroupLayout(groups=(GroupSpec("a", 0, 2, ()), GroupSpec("b", 2, 2, ())), layers=(), k_in=1, k_out=1)


def test_the_recall_table_repeats_the_validated_column():
    rng = np.random.default_rng(0)
    train, queries = torch.from_numpy(rng.normal(size=(40, 4)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(12, 4)).astype(np.float32))
    truth, asked = list(rng.integers(0, 3, 40)), list(rng.integers(0, 3, 12))
    aspects = {"general": {"weights": [0.5, 0.5]}, "subject": {"weights": [0.9, 0.1]}}
    weights = {"groups": ["a", "b"], "aspects": aspects}
    plain = aspect_recall_table(queries, _layout(), None, train, weights=weights, query_attributes={"subject": asked},
                                train_attributes={"subject": truth}, k=5)
    assert "validated" not in plain["subject"]  # unvalidated weights: no such column
    for chosen, column in (("general", "general"), ("subject", "aspect"), ("uniform", "uniform")):
        aspects["subject"] |= {"answered_by": chosen, "validation": {"recall": {}}}
        table = aspect_recall_table(queries, _layout(), None, train, weights=weights,
                                    query_attributes={"subject": asked}, train_attributes={"subject": truth}, k=5)
        assert table["subject"]["validated"] == table["subject"][column]


def test_searchers_answer_an_aspect_with_its_validated_weighting():
    def served(aspects):
        manifest = IndexManifest(version="v1", sequence=1, model=ModelRecord("f"), featurize={},
                                 layout=_layout().to_manifest(), dtype="float16", dataset={}, shards=())
        return ServedIndex(uri="mem://i", manifest=manifest, layout=_layout(), kernel=[],
                           weights={"groups": ["a", "b"], "aspects": aspects} if aspects is not None else None,
                           weights_source=None, weights_name="learned", example_ids=[], uris=[], captions=[],
                           search_index=None, part=0, parts=1, load_seconds=0.0)

    index = served({"general": {"weights": [0.5, 0.5]}, "subject": {"weights": [0.9, 0.1], "answered_by": "general"},
                    "style": {"weights": [0.1, 0.9], "answered_by": "style"},
                    "background": {"weights": [0.2, 0.8], "answered_by": "uniform"}})
    assert index.resolve_aspects(("subject", "style", "background", "general"), False) == {
        "subject": "general", "style": "style", "background": "uniform", "general": "uniform"}
    assert index.choices()["subject"] == {"answered_by": "general", "by": "unvalidated"}
    # Weights without a recorded choice answer with their own weights; general with uniform ones.
    assert served({"subject": {"weights": [0.9, 0.1]}}).resolve_aspects(("subject",), False) == {"subject": "subject"}
    assert served({"general": {"weights": [0.9, 0.1], "answered_by": "general"}}).resolve_aspects(
        ("general",), False) == {"general": "general"}
    # A choice naming weights this artifact lacks is not followed.
    assert served({"subject": {"weights": [0.9, 0.1], "answered_by": "general"}}).resolve_aspects(
        ("subject",), False) == {"subject": "subject"}
    with pytest.raises(MissingWeightsError):
        served(None).resolve_aspects(("subject",), False)
