"""Indexes and weights already on disk keep loading and answering.

``tests/fixtures/index-schema1`` is a small index (24 rows, 2 shards, block-diagonal kernel)
with learned weights, written by attribution 0.1.0 before the manifest became a typed
contract (``IndexManifest``), together with the answers that code gave to two seeded queries
(``expected_answers.json``). Its files are never rewritten: a reader that stops reading them,
or reads them differently, fails here.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from attribution_core.errors import ManifestMismatchError
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.opening import open_version
from attribution_core.index.reader import load_index
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import check_weights, find_weights, weights_matrix
from attribution_core.weights.served import ServedIndex

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "index-schema1"


def _manifest_files() -> list[Path]:
    return sorted(FIXTURE.glob("versions/*/manifest.json"))


def test_the_manifest_of_schema_1_reads_and_writes_back_byte_for_byte():
    files = _manifest_files()
    assert files
    for path in files:
        doc = json.loads(path.read_text())
        manifest = IndexManifest.from_json(doc, str(path))
        assert manifest.to_json() == doc  # the same document: nothing lost, renamed or added
        assert manifest.rows == doc["rows"] == sum(s.rows for s in manifest.shards)


def test_an_old_index_opens_loads_and_its_weights_fit_it():
    store = IndexStore(str(FIXTURE))
    manifest = open_version(store)
    loaded = load_index(str(FIXTURE))
    assert loaded.features.shape == (manifest.rows, manifest.group_layout.k_total) == (24, loaded.layout.k_total)
    assert len(set(loaded.example_ids)) == 24 and len(loaded.kernel) == len(manifest.stats["blocks"])
    document = find_weights(store, manifest, "learned")
    assert document is not None
    check_weights(document, manifest)
    matrix = weights_matrix(document, ["general", "subject", "uniform"])
    assert matrix.shape == (3, len(manifest.group_layout.groups))
    assert torch.allclose(matrix.sum(dim=1), torch.ones(3), atol=1e-5)


def test_an_old_index_answers_as_it_did():
    expected = json.loads((FIXTURE / "expected_answers.json").read_text())
    served = ServedIndex.load(str(FIXTURE))
    queries = torch.randn(2, served.layout.k_total, generator=torch.Generator().manual_seed(expected["query_seed"]))
    answers = served.search(queries, expected["weightings"], [expected["k"]] * 2)
    for got, want in zip(answers, expected["answers"]):
        assert got.keys() == want.keys()
        for weighting, rows in want.items():
            assert [r["example_id"] for r in got[weighting]] == [eid for eid, _ in rows]
            assert [r["score"] for r in got[weighting]] == pytest.approx([s for _, s in rows], rel=1e-5)


def test_a_newer_schema_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "index"
    shutil.copytree(FIXTURE, root)
    path = next(root.glob("versions/*/manifest.json"))
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "schema_version": 2}))
    with pytest.raises(ManifestMismatchError, match=r"schema 2; this version of attribution reads attribution-index "
                                                    r"schema 1: open it with the version that wrote it, or rebuild"):
        open_version(IndexStore(str(root)))
    path.write_text(json.dumps({key: value for key, value in doc.items() if key != "shards"}))
    with pytest.raises(ManifestMismatchError, match="not a complete attribution-index manifest"):
        open_version(IndexStore(str(root)))

    path.write_text(json.dumps(doc))
    store = IndexStore(str(root))
    weights = next(root.glob("versions/*/weights/learned.json"))
    newer = copy.deepcopy(json.loads(weights.read_text()))
    newer["schema_version"] = 2
    weights.write_text(json.dumps(newer))
    with pytest.raises(ManifestMismatchError, match="weights artifact of schema 2.*learn the weights again"):
        find_weights(store, store.latest(), "learned")  # an error, never "no weights"
