"""``attribution evaluate`` on a dataset that is not the synthetic one: no captions, no
attribute columns, an unconditional model. LDS is still measured; Recall says why not; the
ground truth is reused when only the weights change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from attribution_core.config import ProjectConfig, from_mapping
from attribution_core.config_evaluate import PUBLISHED_DAMPING
from attribution_core.evaluation.intervals import spearman_rows
from attribution_core.data.writers import synthetic_rows, write_parquet_dataset
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import artifact_path
from pipelines.evaluation.job import EvaluateRequest, evaluate
from tests.pipelines.conftest import tiny_main_job


def _plain_images(uri: str, n: int) -> None:
    """Images only: no caption column, no attribute columns, ids from the content hash."""
    schema = pa.schema([("image", pa.binary())])
    write_parquet_dataset(uri, ({"image": r["image"]} for r in synthetic_rows(n, 7, 16)), schema, {"kind": "plain"})


def test_unconditional_dataset_without_captions_or_attributes(tmp_path, ray_cluster):
    settings = tiny_main_job(tmp_path, kernel_rule="objective", train={"conditioning": "none"},
                             subset_train={"conditioning": "none"}, weights={"aspects": ["general"]},
                             evaluate={"bases": ["tracin", "das"], "checkpoints": 2, "noise_ceiling": True,
                                       "published": {"pipelines": ["das"], "dims": [32], "residual_timesteps": 10},
                                       "frontier": {"projection": [8], "timesteps": [3], "noise_draws": [1],
                                                    "timing_examples": 4}})
    _plain_images(settings["data"]["uri"], 48)
    folder = tmp_path / "exemplars" / "mine"  # no columns to draw sets from: a folder of the user's images
    folder.mkdir(parents=True)
    for i, row in enumerate(synthetic_rows(3, 99, 16)):
        folder.joinpath(f"{i}.png").write_bytes(row["image"])
    settings["evaluate"]["exemplars"] = {"folder": str(tmp_path / "exemplars"), "columns": {}, "size": 3,
                                         "queries": 3, "steps": 10, "batch_size": 3, "distractors": 0}
    cfg = from_mapping(ProjectConfig, settings)
    metrics = evaluate(cfg, EvaluateRequest())
    check = metrics["exemplar_check"]  # an unconditional model: customized without a word, queries unprompted
    assert check["prompt"] is None and check["sets"][0]["name"] == "mine" and check["sets"][0]["kind"] == "general"
    assert set(check["table"]) == {"general"} and check["table"]["general"]["control"]["queries"] == 3

    assert set(metrics["lds"]) == {"tracin", "das"} and metrics["n_subsets"] == 4 and metrics["n_queries"] == 5
    # the kernel basis' index chose its damping by the objective rule, and says so; TracIn has no kernel
    chosen = metrics["lds"]["das"]["kernel_choice"]
    assert chosen["rule"] == "objective" and chosen["damping"] in (0.01, 1.0)  # the index grid of tiny_main_job
    values = [v for by_damping in chosen["objective"].values() for v in by_damping.values()]
    assert min(values) == chosen["objective"][chosen["kernel"]][str(chosen["damping"])]
    assert "kernel_choice" not in metrics["lds"]["tracin"]
    loss_index = IndexStore(str(tmp_path / "eval" / "lds" / "index-loss")).latest()  # no basis here uses its kernel
    assert loss_index.stats["kernel_choice"]["rule"] == "fixed" and loss_index.stats["kernel"] == "layer_block"
    assert metrics["recall_at_10"] == {} and "none-conditioned" in metrics["info"]["recall_skipped"]
    assert metrics["info"]["query_mix"] == "3 generated, 2 held-out real"
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Not measured: the model is none-conditioned" in report

    # The held-out real queries are outside the universe the subset models trained on.
    detail = json.loads((tmp_path / "eval" / "lds_per_query.json").read_text())
    universe = {r["example_id"] for r in _read(tmp_path / "eval" / "lds" / "data")}
    held = [q["example_id"] for q in detail["queries"] if q["kind"] == "heldout"]
    assert len(held) == 2 and not set(held) & universe and len(universe) == 24

    # LDS recomputed from the cached ground truth and the per-query values agree.
    gt = metrics["info"]["ground_truth"]
    outputs = np.stack([np.load(f"{gt['folder']}/subset-{s:04d}.npy") for s in range(4)], axis=1)  # [Q, S]
    assert outputs.shape == (5, 4) and np.isfinite(outputs).all()
    assert len({tuple(np.round(outputs[:, s], 12)) for s in range(4)}) == 4  # every subset model differs
    per_query = np.array(detail["lds"]["das"]["uniform"], dtype=float)
    assert abs(np.nanmean(per_query) - metrics["lds"]["das"]["uniform"]) < 1e-4  # metrics round to 4 places

    _references_frontier_and_ceiling(metrics, detail)
    # Without validation queries (an unconditional model) and without an LDS of its basis
    # (D-TRAK, not evaluated here), the served index answers 'general' with uniform weights.
    assert metrics["info"]["answered_by"] == {"general": "uniform"}
    assert metrics["info"]["choices"]["general"]["by"] == "unvalidated"

    # Other weight settings (LDS of one basis): the weights are learned again, the retrained
    # models are reused, and uniform-weight LDS (which does not depend on them) is unchanged.
    changed = from_mapping(ProjectConfig, {**settings, "weights": {**settings["weights"], "lambda_w": 0.5},
                                           "evaluate": {**settings["evaluate"], "bases": ["das"], "published": None,
                                                        "frontier": None, "noise_ceiling": False}})
    again = evaluate(changed, EvaluateRequest(recall=False))
    assert again["info"]["ground_truth"]["trained"] == 0 and again["info"]["ground_truth"]["key"] == gt["key"]
    assert set(again["lds"]) == {"das"}
    das_index = IndexStore(again["info"]["lds_indexes"]["das"]["uri"])
    document = das_index.read_json(artifact_path(again["info"]["lds_indexes"]["das"]["version"], "das"))
    assert document["settings"]["lambda_w"] == 0.5  # learned again under the new settings
    assert again["lds"]["das"]["uniform"] == metrics["lds"]["das"]["uniform"]
    _das_index_serves_its_formula(str(tmp_path / "eval" / "lds"))


def _references_frontier_and_ceiling(metrics: dict, detail: dict) -> None:
    """The optional parts: names that say what each basis computes, the served choice by its
    rule, the noise ceiling from a second ground truth, the published DAS reference (with our
    DAS-style basis against it) and the frontier, whose rows recompute the main table's where
    they measure the same thing."""
    lds = metrics["lds"]
    assert lds["tracin"]["label"].startswith("TracIn-CP") and lds["tracin"]["checkpoints"] == 2
    assert lds["das"]["label"].startswith("DAS-style") and lds["das"]["checkpoints"] == 1
    for basis, row in lds.items():  # uniform unless learned's two-way interval lies above 0
        expected = "learned" if row["difference_ci"][0] > 0 else "uniform"
        assert row["served"]["weighting"] == metrics["lds_served"][basis]["weighting"] == expected
        lo, hi = row["uniform_ci"]
        assert lo <= row["uniform"] <= hi
    ceiling = metrics["lds_noise_ceiling"]
    assert ceiling["ground_truth"]["trained"] == 4 and ceiling["ground_truth"]["key"] != metrics["info"]["ground_truth"]["key"]
    assert -1 <= ceiling["agreement"] <= 1 and len(detail["noise_ceiling"]) == metrics["n_queries"]
    assert set(ceiling["against_mean"]) == {"tracin", "das"} and ceiling["ceiling_of_mean"] >= ceiling["ceiling"]
    row = metrics["lds_published"]["das-32"]
    assert row["label"] == "DAS as published (32 dimensions)" and row["kernel_scale"] == "mean_abs"
    assert set(row["dampings"]) <= set(PUBLISHED_DAMPING) and -1 <= row["lds"] <= 1
    assert row["featurize_s_per_row"] > 0 and row["ours_featurize_s_per_row"] > 0 and row["bytes_per_row"] == 64
    assert len(row["versus"]["das"]) == 3 and len(detail["published"]["das-32"]) == metrics["n_queries"]
    cached = json.loads(next((Path(metrics["report"]).parent / "lds" / "published").glob("*.json")).read_text())
    predicted = np.asarray(cached["das-32"]["predicted"])  # [Q, S], kept for the paired comparisons of a rerun
    gt = metrics["info"]["ground_truth"]
    actual = -np.stack([np.load(f"{gt['folder']}/subset-{s:04d}.npy") for s in range(4)], axis=1)
    np.testing.assert_allclose(spearman_rows(predicted, actual), np.asarray(detail["published"]["das-32"], dtype=float),
                               atol=1e-9, equal_nan=True)
    paper = row["paper_setting"]
    assert paper["difference"] == pytest.approx(paper["learned"] - paper["uniform"], abs=2e-4)
    frontier = metrics["lds_frontier"]["settings"]
    assert set(frontier) == {"default", "timesteps-3", "ensemble-2"}
    assert frontier["timesteps-3"]["featurize"]["timesteps"] == 3 and frontier["default"]["featurize"]["timesteps"] == 2
    assert frontier["ensemble-2"]["bytes_per_row"] == 2 * frontier["default"]["bytes_per_row"]
    assert frontier["default"]["bases"]["das"]["versus_default"] == [0.0, 0.0, 0.0]
    # every setting against the published DAS on the same resamples; the default's is the table's
    assert all(set(r["bases"]["das"]["versus_published"]) == {"das-32"} for r in frontier.values())
    assert frontier["default"]["bases"]["das"]["versus_published"]["das-32"] == pytest.approx(row["versus"]["das"], abs=1e-4)
    assert frontier["default"]["bases"]["tracin"]["versus_published"] == {}
    assert all(r["featurize_s_per_row"] > 0 for r in frontier.values())
    # the same indexes and weights give the same numbers: the default setting's DAS is the
    # table's, the ensemble's TracIn is the table's TracIn-CP
    assert frontier["default"]["bases"]["das"]["uniform"] == pytest.approx(lds["das"]["uniform"], abs=1e-4)
    assert frontier["ensemble-2"]["bases"]["tracin"]["uniform"] == pytest.approx(lds["tracin"]["uniform"], abs=1e-4)
    # the served index is D-TRAK's, not among these bases: no setting is selected for it
    assert metrics["lds_frontier"]["selection"]["chosen"] is None


def _das_index_serves_its_formula(folder: str) -> None:
    """The DAS index the evaluation built answers through the serving path with
    ``tau(q, x) = (K g(q))^T g(x) * s(x)``: K from the stored (unscaled) features, s(x) the
    stored row scale, the query without one."""
    import torch

    from attribution_core.features.query import featurize_images
    from attribution_core.index.opening import version_featurizer
    from attribution_core.index.reader import load_index
    from attribution_core.index.schema import flat_matrix, row_scale
    from attribution_core.weights.served import ServedIndex
    from pipelines.models import load_model_dir

    index = load_index(f"{folder}/index-das")
    assert index.manifest.featurize["measurement"] == "das" and index.row_scale is not None
    table = pa.concat_tables([pq_read(f"{folder}/index-das/{s.path}") for s in index.manifest.shards])
    stored = flat_matrix(table, index.layout, np.float64, scaled=False)  # [N, D]
    scale = row_scale(table).astype(np.float64)  # [N]
    assert np.ptp(scale) > 0 and (scale > 0).all()
    featurizer = version_featurizer(load_model_dir(f"{folder}/model"), index.manifest, 64)
    query = featurize_images(featurizer, _read_images(f"{folder}/data", 1)).double().numpy()[0]  # [D]
    preconditioned = np.zeros_like(query)
    for block in index.manifest.stats["blocks"]:  # K = (G^T G + lambda I)^-1 per block
        sl = slice(block["offset"], block["offset"] + block["dim"])
        gram = stored[:, sl].T @ stored[:, sl]
        preconditioned[sl] = np.linalg.solve(gram + block["lambda"] * np.eye(block["dim"]), query[sl])
    expected = (preconditioned @ stored.T) * scale / len(index.layout.groups)  # uniform weights: 1/M per group
    found = ServedIndex.load(f"{folder}/index-das").search(torch.from_numpy(query).float()[None],
                                                           [["uniform"]], [5])[0]["uniform"]
    by_id = dict(zip(table.column("example_id").to_pylist(), expected))
    scores = [r["score"] for r in found]
    # each answer's score is its formula value (float16 storage: ~1e-3), best first, and no
    # example outside the answers scores clearly above the fifth
    np.testing.assert_allclose(scores, [by_id[r["example_id"]] for r in found], rtol=1e-2, atol=1e-3 * abs(scores[0]))
    assert scores == sorted(scores, reverse=True)
    assert np.sort(expected)[-5] <= scores[-1] + 1e-2 * abs(scores[0])
    assert not np.allclose(expected, (preconditioned @ stored.T) / len(index.layout.groups))  # the scale matters


def pq_read(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _read_images(uri: str, n: int) -> list[bytes]:
    import pyarrow.parquet as pq

    return pq.read_table(uri, columns=["image"]).column("image").to_pylist()[:n]


def _read(uri) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(uri), columns=["example_id"]).to_pylist()
