"""The index job on a local Ray (num_cpus=2): results joined on example_id, never row order."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.readers import read_examples
from attribution_core.data.writers import synthetic_rows
from attribution_core.errors import ManifestMismatchError
from attribution_core.features.featurize import featurize
from attribution_core.index.kernel import kernel_from_gram
from attribution_core.index.store import IndexStore, shard_name
from attribution_core.models.adapters import ExampleBatch
from pipelines.index.job import IndexRequest, run_index
from tests.pipelines.conftest import N, bad_rows, error_ids, features_by_id, project, read_index, write_rows

def test_rows_are_the_input_ids_and_bad_rows_are_quarantined(full_build, good_rows):
    manifest, table = read_index(full_build["out"])
    ids = table.column("example_id").to_pylist()
    assert sorted(ids) == sorted(r["example_id"] for r in good_rows)
    assert len(ids) == len(set(ids)) == manifest.rows == full_build["result"]["rows"] == N
    errors = error_ids(full_build["out"])
    assert set(errors) == {"bad-bytes", "no-caption", "tiny", "elongated"}
    assert "cannot decode" in errors["bad-bytes"]
    assert "missing caption" in errors["no-caption"]
    assert "shorter side" in errors["tiny"] and "elongated" in errors["elongated"]
    assert full_build["result"]["errors"] == 4
    assert IndexStore(full_build["out"]).latest().version == full_build["result"]["version"]


def test_features_equal_featurize_on_the_driver(full_build, adapters):
    cfg = project()
    manifest, by_id = features_by_id(full_build["out"])
    sample = {ex.example_id: ex for ex in read_examples(full_build["data"]) if ex.example_id in list(by_id)[::7]}
    adapter = adapters["text"]
    ids = tuple(sorted(sample))
    batch = ExampleBatch(
        example_ids=ids,
        pixels=torch.from_numpy(np.stack([decode_image(sample[i].image, i, 16, 3) for i in ids])),
        captions=tuple(sample[i].caption for i in ids))
    groups = featurize(adapter, batch, cfg.featurize)
    ref = torch.cat(list(groups.values()), dim=1).numpy()
    stored = np.stack([by_id[i] for i in ids])
    rel = np.linalg.norm(stored - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < 2e-3, rel  # float16 storage: ~5e-4 relative per number
    assert manifest.dtype == "float16"


def test_shards_are_plain_parquet_for_pyarrow_pandas_duckdb(full_build):
    manifest, _ = read_index(full_build["out"])
    path = f"{full_build['out']}/{manifest.shards[0].path}"
    group = manifest.layout["groups"][0]
    column = manifest.columns[group["name"]]
    one_group = pq.read_table(path, columns=["example_id", column])  # reading one group decodes one column
    assert one_group.column(column).type.list_size == group["dim"]
    frame = pq.read_table(path).to_pandas()
    assert len(frame[column].iloc[0]) == group["dim"]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select example_id, \"{column}\" from '{path}'").fetchall()
    assert len(rows) == manifest.shards[0].rows and len(rows[0][1]) == group["dim"]


def test_gram_and_kernel_equal_a_direct_computation(full_build):
    manifest, by_id = features_by_id(full_build["out"])
    store = IndexStore(full_build["out"])
    phi = np.stack(list(by_id.values())).astype(np.float64)  # [N, k_total]
    stats = manifest.stats
    assert stats["kernel"] == "full" and len(stats["blocks"]) == 1  # k_total is small here
    block = stats["blocks"][0]
    gram = store.read_array(block["gram"])
    np.testing.assert_allclose(gram, phi.T @ phi, rtol=1e-10, atol=1e-12)
    lam = 0.01 * np.trace(gram) / gram.shape[0]
    direct = np.linalg.inv(phi.T @ phi + lam * np.eye(gram.shape[0]))
    np.testing.assert_allclose(store.read_array(block["kernel"]), direct, rtol=1e-6, atol=1e-9 * np.abs(direct).max())
    assert block["lambda"] == pytest.approx(lam)


def test_same_results_with_one_actor_and_another_batch_size(full_build, tmp_path, model_dirs):
    out = str(tmp_path / "one-actor")
    run_index(project({"actors": 1, "batch_size": 5, "kernel": "block_diagonal"}),
              IndexRequest(dataset=full_build["data"], model=model_dirs["text"], out=out))
    _, a = features_by_id(full_build["out"])
    manifest, b = features_by_id(out)
    assert a.keys() == b.keys()
    for eid in a:
        np.testing.assert_allclose(a[eid], b[eid], rtol=2e-3, atol=1e-6 * np.abs(a[eid]).max())
    assert manifest.build.actors == 1 and manifest.build.batch_size == 5
    # Block-diagonal stats: one block per group, each the Gram of that group's columns.
    phi = np.stack(list(b.values())).astype(np.float64)
    store = IndexStore(out)
    blocks = manifest.stats["blocks"]
    assert manifest.stats["kernel"] == "block_diagonal" and len(blocks) == len(manifest.layout["groups"])
    for blk in blocks:
        x = phi[:, blk["offset"] : blk["offset"] + blk["dim"]]
        np.testing.assert_allclose(store.read_array(blk["gram"]), x.T @ x, rtol=1e-10, atol=1e-12)
        kernel, _ = kernel_from_gram(x.T @ x, 0.01)
        np.testing.assert_allclose(store.read_array(blk["kernel"]), kernel, rtol=1e-8, atol=1e-12)


def test_incremental_update_equals_a_full_rebuild(full_build, tmp_path, model_dirs, good_rows):
    rows = [dict(r) for r in good_rows[3:]]  # 3 removed
    rows[0]["caption"] = rows[0]["caption"] + " again"  # changed caption
    rows[1]["image"] = encode_png(np.full((16, 16, 3), 200, dtype=np.uint8))  # changed image
    rows += [dict(r, example_id=f"new-{i}") for i, r in enumerate(synthetic_rows(4, seed=9, size=16))]
    rows += bad_rows()[:1]  # an unchanged quarantined example stays quarantined
    data = write_rows(str(tmp_path / "data-v2"), rows)
    # Update a copy of the shared index so its other tests keep their version.
    out = str(tmp_path / "index")
    shutil.copytree(full_build["out"], out)
    base = IndexStore(out).latest()
    update = run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    rebuild = str(tmp_path / "rebuild")
    run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=rebuild))

    manifest, inc = features_by_id(out)
    _, full = features_by_id(rebuild)
    build = manifest.build
    assert build.mode == "incremental" and build.base == base.version == manifest.supersedes
    assert (build.new, build.changed, build.removed) == (4, 2, 3 + 3)  # 3 good + 3 bad rows left
    assert build.featurized == 6 and update["featurized"] == 6
    assert inc.keys() == full.keys()
    for eid in full:
        np.testing.assert_allclose(inc[eid], full[eid], rtol=2e-3, atol=1e-6 * np.abs(full[eid]).max())
    assert set(error_ids(out)) == set(error_ids(rebuild)) == {"bad-bytes"}
    # Unchanged shards are referenced from the base version, not copied.
    assert any(s.path.startswith(f"versions/{base.version}/") for s in manifest.shards)
    gram = IndexStore(out).read_array(manifest.stats["blocks"][0]["gram"])
    rebuilt = IndexStore(rebuild).read_array(IndexStore(rebuild).latest().stats["blocks"][0]["gram"])
    np.testing.assert_allclose(gram, rebuilt, rtol=0, atol=1e-4 * np.abs(rebuilt).max())  # float16 last bits
    again = run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    assert again["up_to_date"] and again["version"] == update["version"]


def test_other_featurize_settings_are_refused_incrementally_and_rebuilt_fully(full_build, tmp_path, model_dirs):
    out = str(tmp_path / "index")
    shutil.copytree(full_build["out"], out)  # the shared index, built with seed 0
    first = IndexStore(out).latest()
    other = project(featurize={"seed": 1})
    with pytest.raises(ManifestMismatchError, match=r"featurize\.seed: 0 != 1"):
        run_index(other, IndexRequest(dataset=full_build["data"], model=model_dirs["text"], out=out, mode="incremental"))
    with pytest.raises(ManifestMismatchError, match="model fingerprint"):
        run_index(project(), IndexRequest(dataset=full_build["data"], model=model_dirs["text-latent"], out=out,
                                          mode="incremental"))
    rebuilt = run_index(other, IndexRequest(dataset=full_build["data"], model=model_dirs["text"], out=out))
    manifest = IndexStore(out).latest()
    assert rebuilt["mode"] == "full" and rebuilt["featurized"] == N
    assert manifest.supersedes == first.version and manifest.sequence == 2
    assert all(s.path.startswith(f"versions/{rebuilt['version']}/") for s in manifest.shards)
    # The superseded version is untouched and still readable.
    assert IndexStore(out).manifest(first.version).rows == N


def test_round_trip_on_s3(s3_base, ray_cluster, model_dirs, good_rows):
    data = write_rows(f"{s3_base}/datasets/small", good_rows[:12] + bad_rows()[:1])
    out = f"{s3_base}/indexes/small"
    result = run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    manifest, by_id = features_by_id(out)
    assert result["uri"] == out and manifest.rows == 12 == len(by_id)
    assert set(error_ids(out)) == {"bad-bytes"}
    assert IndexStore(out).read_array(manifest.stats["blocks"][0]["kernel"]).shape[0] == manifest.layout["k_total"]
    again = run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    assert again["up_to_date"]


def test_image_folder_dataset_with_a_missing_file(tmp_path, ray_cluster, model_dirs, good_rows):
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = []
    for row in good_rows[:6]:
        (folder / f"{row['example_id']}.png").write_bytes(row["image"])
        lines.append(json.dumps({"file_name": f"{row['example_id']}.png", "caption": row["caption"],
                                 "subject": row["subject"]}))
    lines.append(json.dumps({"file_name": "missing.png", "caption": "a filled circle"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "index")
    result = run_index(project(), IndexRequest(dataset=str(folder), model=model_dirs["text"], out=out))
    manifest, by_id = features_by_id(out)
    assert sorted(by_id) == sorted(f"{r['example_id']}.png" for r in good_rows[:6])
    assert result["errors"] == 1 and "no image bytes" in error_ids(out)["missing.png"]
    assert manifest.dataset["layout"] == "imagefolder"
    _, table = read_index(out)
    assert all(u.startswith(str(folder)) for u in table.column("uri").to_pylist())


def test_dedupe_keeps_each_example_once_when_a_retry_regrouped_a_batch(tmp_path):
    from pipelines.index.commit import IncompleteBuildError, check_exactly_once, dedupe, shard_ids

    store = IndexStore(str(tmp_path / "ix"))
    for ids in (["a", "b"], ["b", "c"], ["c"]):
        store.write_table(f"versions/v/features/{shard_name(ids)}", pa.table({"example_id": ids, "x": [1.0] * len(ids)}))
    paths = store.list_shards("v", "features")
    with pytest.raises(IncompleteBuildError, match="2 repeated"):
        check_exactly_once({"a", "b", "c"}, shard_ids(store, paths), {})
    fixed = dedupe(store, shard_ids(store, paths))
    check_exactly_once({"a", "b", "c"}, fixed, {})
    assert sorted(fixed) == store.list_shards("v", "features")
    assert sorted(i for ids in fixed.values() for i in ids) == ["a", "b", "c"]
    with pytest.raises(IncompleteBuildError, match="1 examples missing"):
        check_exactly_once({"a", "b", "c", "d"}, fixed, {})


def test_dedupe_claims_an_existing_shard_that_already_holds_the_rewrite(tmp_path):
    from pipelines.index.commit import check_exactly_once, dedupe, shard_ids

    # Ids chosen so that [p, q] sorts first and [q, r] rewritten without q is named like [r].
    p, q, r = next((f"p{i}", f"q{i}", f"r{i}") for i in range(1000)
                   if shard_name([f"p{i}", f"q{i}"]) < shard_name([f"q{i}", f"r{i}"]) < shard_name([f"r{i}"]))
    store = IndexStore(str(tmp_path / "ix"))
    for ids in ([p, q], [q, r], [r]):
        store.write_table(f"versions/v/features/{shard_name(ids)}", pa.table({"example_id": ids}))
    fixed = dedupe(store, shard_ids(store, store.list_shards("v", "features")))
    check_exactly_once({p, q, r}, fixed, {})
    assert sorted(fixed) == store.list_shards("v", "features")
    assert sorted(fixed.values()) == [[p, q], [r]]


def test_kernel_chosen_by_the_objective_equals_a_direct_computation(tmp_path, ray_cluster, model_dirs, good_rows):
    """``kernel: objective`` with ``damping_rule: objective`` on a DAS index: the recorded
    objective of each (structure, damping) is the weight objective at uniform weights over
    every stored row (scores against the row-scaled features, K from the unscaled Gram), the
    choice is its argmin, and the kernel written is the chosen one."""
    from attribution_core.config import to_mapping
    from attribution_core.index.damping import kernel_blocks
    from attribution_core.index.kernel import blocks
    from attribution_core.index.schema import flat_matrix
    from pipelines.index.damping import _featurized_queries
    from pipelines.models import ModelRef
    from pipelines.weights.queries import prompts_for

    data = write_rows(str(tmp_path / "data"), good_rows)
    grid = [0.001, 0.1, 10.0]
    cfg = project(index={"kernel": "objective", "damping_rule": "objective", "damping_grid": grid,
                         "damping_queries": 3}, featurize={"measurement": "das"}, weights={"sample_steps": 2, "top_k": 4})
    out = str(tmp_path / "index")
    run_index(cfg, IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    manifest, table = read_index(out)
    store = IndexStore(out)
    choice = manifest.stats["kernel_choice"]
    assert choice["rule"] == "objective" and choice["queries"] == 3
    assert set(choice["objective"]) == {"full", "block_diagonal", "layer_block"}  # k_total fits a full kernel here
    assert all(set(v) == {str(d) for d in grid} for v in choice["objective"].values())

    layout = manifest.group_layout
    stored = flat_matrix(table, layout, np.float64, scaled=False)
    scored = flat_matrix(table, layout, np.float64)
    assert not np.allclose(stored, scored)
    wcfg = dataclasses.replace(cfg.weights, queries_per_aspect=3)
    prompts = prompts_for("general", wcfg, store, manifest.shard_paths, conditioning="text", stream="damping-prompts")
    queries = torch.from_numpy(_featurized_queries(ModelRef(model_dirs["text"]), "cpu", to_mapping(cfg.featurize),
                                                   to_mapping(wcfg), prompts=prompts)).double() / len(layout.groups)
    direct = {}
    for kind in choice["objective"]:
        spans = [(offset, dim, stored[:, offset : offset + dim].T @ stored[:, offset : offset + dim])
                 for _, offset, dim in blocks(layout, kind)]
        for d in grid:
            preconditioned = torch.zeros_like(queries)
            for offset, dim, kernel in kernel_blocks(spans, d):
                preconditioned[:, offset : offset + dim] = queries[:, offset : offset + dim] @ kernel
            scores = preconditioned @ torch.from_numpy(scored).T  # [Q, N]
            top = torch.topk(scores, 4, dim=1).values.mean(1)
            direct[(kind, d)] = float((-top / scores.norm(dim=1)).mean())
            assert choice["objective"][kind][str(d)] == pytest.approx(direct[(kind, d)], rel=1e-3, abs=1e-5)
    best = min(direct, key=direct.get)
    assert (choice["kernel"], choice["damping"]) == best
    assert (manifest.stats["kernel"], manifest.stats["damping"]) == best
    written = manifest.stats["blocks"]
    assert [(b["offset"], b["dim"]) for b in written] == [(o, n) for _, o, n in blocks(layout, best[0])]
    for b in written:
        sl = slice(b["offset"], b["offset"] + b["dim"])
        np.testing.assert_allclose(store.read_array(b["gram"]), stored[:, sl].T @ stored[:, sl], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(store.read_array(b["kernel"]), kernel_from_gram(stored[:, sl].T @ stored[:, sl],
                                                                                    best[1])[0], rtol=1e-6, atol=1e-9)


def test_other_kernel_settings_make_a_new_version_over_the_same_shards(full_build, tmp_path, model_dirs):
    """Only the kernel's damping changes: a new version that reuses every shard and rebuilds
    the kernel; the same settings again are up to date."""
    out = str(tmp_path / "index")
    shutil.copytree(full_build["out"], out)
    before, _ = read_index(out)
    changed = run_index(project(index={"damping": 0.5}), IndexRequest(dataset=full_build["data"],
                                                                       model=model_dirs["text"], out=out))
    after, _ = read_index(out)
    assert not changed["up_to_date"] and after.version != before.version and changed["featurized"] == 0
    assert [s.path for s in after.shards] == [s.path for s in before.shards]
    assert after.stats["damping"] == 0.5 and after.stats["settings"]["damping"] == 0.5
    assert after.stats["blocks"][0]["lambda"] == pytest.approx(50 * before.stats["blocks"][0]["lambda"])
    again = run_index(project(index={"damping": 0.5}), IndexRequest(dataset=full_build["data"],
                                                                     model=model_dirs["text"], out=out))
    assert again["up_to_date"] and again["version"] == after.version
