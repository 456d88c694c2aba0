"""Index building blocks without Ray: planning, kernels, specs, batches, storage, fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from attribution_core.config import FeaturizeConfig, ProjectionConfig
from attribution_core.data.images import decode_image, encode_png
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import build_layout
from attribution_core.index.batch import ImageLimits, index_batch
from attribution_core.index.kernel import BLOCK_DIAGONAL, FULL, LAYER_BLOCK, kernel_from_gram, partial_gram
from attribution_core.index.manifest import FeatureSpec, IndexManifest, ModelRecord, check_same_features
from attribution_core.errors import InputError, ManifestMismatchError
from attribution_core.index.plan import check_unique, plan_build
from attribution_core.index.schema import SOURCE_SCHEMA, features_table, flat_matrix
from attribution_core.index.source import content_hash, normalize, resolve_source
from attribution_core.index.store import IndexStore, shard_name
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter, save_pipeline
from attribution_core.models.fingerprint import model_fingerprint

CFG = FeaturizeConfig(projection=ProjectionConfig(k_in=2, k_out=2))


def keys(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"example_id": [p[0] for p in pairs], "content_hash": [p[1] for p in pairs]})


def test_plan_reuses_unchanged_rows_and_featurizes_new_changed_and_unfinished():
    previous = {"v1/a.parquet": keys([("a", "1"), ("b", "1")]), "v1/b.parquet": keys([("c", "1"), ("d", "1")])}
    current = keys([("a", "1"), ("b", "1"), ("c", "2"), ("e", "1"), ("f", "1")])  # c changed, d removed, e/f new
    plan = plan_build(current, previous, {}, done=keys([("f", "1")]))
    assert sorted(plan.todo.to_pylist()) == ["c", "e"]
    # v1/b.parquet keeps nothing (c changed, d removed), so it is neither referenced nor rewritten.
    assert [(r.path, r.whole, r.keep) for r in plan.reuse] == [("v1/a.parquet", True, ("a", "b"))]
    assert (plan.n_new, plan.n_changed, plan.n_removed, plan.n_reused, plan.n_done) == (2, 1, 1, 2, 1)
    assert not plan.is_noop
    same = plan_build(keys([("a", "1"), ("b", "1")]), {"v1/a.parquet": keys([("a", "1"), ("b", "1")])}, {}, None)
    assert same.is_noop and len(same.todo) == 0
    partly = plan_build(keys([("a", "1")]), {"v1/a.parquet": keys([("a", "1"), ("b", "1")])}, {}, None)
    assert not partly.is_noop and partly.reuse[0].keep == ("a",) and not partly.reuse[0].whole


def test_repeated_ids_are_refused_with_examples():
    with pytest.raises(InputError, match=r"repeats example ids.*'x'"):
        check_unique(keys([("x", "1"), ("y", "1"), ("x", "2")]), "dataset d")


def test_kernel_is_the_damped_inverse_and_blocks_are_slices_of_the_full_gram(adapters):
    layout = build_layout(adapters["unet"].denoiser, CFG.groups, CFG.projection)
    rng = np.random.default_rng(0)
    flat = torch.from_numpy(rng.standard_normal((7, layout.k_total)).astype(np.float32))
    ids = pa.table({"example_id": [str(i) for i in range(7)], "content_hash": ["h"] * 7,
                    "uri": ["u"] * 7, "caption": pa.nulls(7, pa.string())})
    tables = [features_table(ids.slice(0, 3), flat[:3], layout, "float32"),
              features_table(ids.slice(3), flat[3:], layout, "float32")]
    full = partial_gram(tables, layout, FULL)["all"]
    x = flat.double().numpy()
    np.testing.assert_allclose(full, x.T @ x, rtol=1e-12, atol=1e-12)
    blocks = partial_gram(tables, layout, BLOCK_DIAGONAL)
    for g in layout.groups:
        sl = slice(g.offset, g.offset + g.dim)
        np.testing.assert_allclose(blocks[g.name], full[sl, sl], rtol=1e-12)
    by_layer = partial_gram(tables, layout, LAYER_BLOCK)
    assert len(by_layer) == len(layout.layers) > len(layout.groups)
    for layer in layout.layers:
        sl = slice(layer.offset, layer.offset + layer.dim)
        np.testing.assert_allclose(by_layer[layer.name], full[sl, sl], rtol=1e-12)
    kernel, lam = kernel_from_gram(full, 0.1)
    assert lam == pytest.approx(0.1 * np.trace(full) / full.shape[0])
    np.testing.assert_allclose(kernel @ (full + lam * np.eye(len(full))), np.eye(len(full)), atol=1e-8)
    assert np.array_equal(flat_matrix(pa.concat_tables(tables), layout), flat.numpy())


def test_feature_spec_names_every_difference(adapters):
    layout = build_layout(adapters["unet"].denoiser, CFG.groups, CFG.projection)
    a = FeatureSpec.build("f1", CFG, layout, "float16")
    assert a.differences(FeatureSpec.build("f1", CFG.__class__(**{**CFG.__dict__, "max_rows_per_pass": 3}),
                                           layout, "float16")) == []  # not a value-changing setting
    b = FeatureSpec.build("f2", FeaturizeConfig(measurement="loss", projection=CFG.projection), layout, "float32")
    diffs = a.differences(b)
    assert any("model fingerprint" in d for d in diffs)
    assert any(d.startswith("featurize.measurement") for d in diffs)
    assert any(d.startswith("index.dtype") for d in diffs)
    with pytest.raises(ManifestMismatchError, match="measurement"):
        check_same_features(a, b, "index v1", "rebuild")
    manifest = IndexManifest(version="v1", sequence=1, model=ModelRecord("f1"), featurize=a.featurize,
                             layout=a.layout, dtype="float16", dataset={}, shards=())
    assert a.key() == manifest.spec.key()


def source_rows(adapter, rows: list[tuple[str, bytes, str | None]]) -> pa.Table:
    return pa.Table.from_pydict({
        "example_id": [r[0] for r in rows], "content_hash": [content_hash(r[1], r[2], None) for r in rows],
        "uri": [f"mem://{r[0]}" for r in rows], "image": [r[1] for r in rows], "caption": [r[2] for r in rows],
        "label": [None] * len(rows), "metadata": [None] * len(rows)}, schema=SOURCE_SCHEMA)


def test_index_batch_quarantines_each_bad_example_and_keeps_the_rest(adapters):
    adapter = adapters["text"]
    good = encode_png(np.full((16, 16, 3), 90, dtype=np.uint8))
    rows = source_rows(adapter, [("ok", good, "a cross"), ("garbage", b"\x89PNG broken", "x"),
                                 ("nocap", good, None), ("small", encode_png(np.zeros((3, 3, 3), np.uint8)), "x")])
    result = index_batch(Featurizer(adapter, CFG), rows, "float16", ImageLimits(min_side=8, max_aspect=4))
    assert result.features.column("example_id").to_pylist() == ["ok"]
    reasons = dict(zip(result.errors.column("example_id").to_pylist(), result.errors.column("reason").to_pylist()))
    assert set(reasons) == {"garbage", "nocap", "small"}
    assert "cannot decode" in reasons["garbage"] and "missing caption" in reasons["nocap"]
    nothing = index_batch(Featurizer(adapter, CFG), rows.slice(1, 1), "float16")
    assert nothing.features.num_rows == 0 and nothing.errors.num_rows == 1


def test_class_labels_are_read_as_integers_or_by_the_models_class_names(adapters):
    adapter = adapters["unet-class"]
    good = encode_png(np.full((16, 16, 3), 90, dtype=np.uint8))
    rows = source_rows(adapter, [("a", good, None), ("b", good, None), ("c", good, None), ("d", good, None)])
    rows = rows.set_column(5, "label", pa.array(["1", "cat", None, "99"], pa.string()))
    result = index_batch(Featurizer(adapter, CFG), rows)
    assert result.features.column("example_id").to_pylist() == ["a"]
    assert set(result.errors.column("example_id").to_pylist()) == {"b", "c", "d"}
    adapter.label_names = ["dog", "cat"]
    try:
        named = index_batch(Featurizer(adapter, CFG), rows)
    finally:
        adapter.label_names = None
    assert named.features.column("example_id").to_pylist() == ["b"]


def test_non_finite_features_are_quarantined(model_dirs, tmp_path):
    adapter = load_adapter(model_dirs["unet"])
    with torch.no_grad():
        adapter.denoiser.conv_out.bias.fill_(float("nan"))
    good = encode_png(np.full((16, 16, 3), 90, dtype=np.uint8))
    result = index_batch(Featurizer(adapter, CFG), source_rows(adapter, [("a", good, None), ("b", good, None)]))
    assert result.features.num_rows == 0
    assert set(result.errors.column("reason").to_pylist()) == {"non-finite feature (NaN or Inf in the gradient)"}


def test_store_writes_atomically_and_moves_latest_after_the_manifest(tmp_path):
    store = IndexStore(str(tmp_path / "ix"))
    table = pa.table({"example_id": ["a"]})
    store.write_table("versions/v1/features/" + shard_name(["a"]), table)
    (tmp_path / "ix/versions/v1/features/.tmp-dead").write_bytes(b"half")
    assert store.list_shards("v1", "features") == [f"versions/v1/features/{shard_name(['a'])}"]
    assert store.remove_temporaries("v1") == 1 and store.latest() is None and not store.is_committed("v1")
    store.commit(IndexManifest(version="v1", sequence=1, model=ModelRecord("f"), featurize={},
                               layout={"groups": []}, dtype="float16", dataset={}, shards=()))
    assert store.latest().version == "v1"
    assert json.loads((tmp_path / "ix/latest").read_text())["version"] == "v1"
    assert shard_name(["b", "a"]) == shard_name(["a", "b"]) != shard_name(["a"])


def test_normalize_reads_both_layouts_hashes_content_and_filters(tmp_path):
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    data = tmp_path / "pq"
    data.mkdir()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": png, "path": None}, {"bytes": png + b"x", "path": None}],
                             "text": ["one", "two"]}), data / "a.parquet")
    spec = resolve_source(str(data), None, None)
    assert spec.caption_column == "text" and not spec.has_example_id
    rows = normalize(pq.read_table(data / "a.parquet"), spec)
    assert rows.column("caption").to_pylist() == ["one", "two"]
    first = rows.column("example_id")[0].as_py()
    kept = normalize(pq.read_table(data / "a.parquet"), spec, pa.array([first]))
    assert kept.column("example_id").to_pylist() == [first]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_bytes(png)
    (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "caption": "c"}\n{"file_name": "gone.png", "caption": "d"}\n')
    spec = resolve_source(str(folder), None, None)
    rows = normalize(pa.Table.from_pylist([{"file_name": "x.png", "caption": "c"}, {"file_name": "gone.png", "caption": "d"}]), spec)
    assert rows.column("image").to_pylist() == [png, b""]  # a missing file is quarantined later, by id
    assert content_hash(png, "c", None) != content_hash(png, "d", None) != content_hash(png, None, None)
    with pytest.raises(InputError, match="no label column 'cls'"):
        resolve_source(str(folder), None, "cls")


def test_fingerprint_ignores_where_a_model_is_saved_and_sees_any_weight(model_dirs, tmp_path):
    adapter = load_adapter(model_dirs["text"])
    copy = save_pipeline({"unet": adapter.denoiser, "scheduler": adapter.scheduler,
                          "text_encoder": adapter.text_encoder, "tokenizer": adapter.tokenizer}, tmp_path / "copy")
    assert model_fingerprint(load_adapter(copy)) == model_fingerprint(adapter)
    changed = load_adapter(copy)
    with torch.no_grad():
        next(changed.text_encoder.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(changed) != model_fingerprint(adapter)


def test_das_shards_keep_unscaled_features_and_score_with_the_row_scale(adapters):
    """A DAS index batch stores g(x) and s(x) apart: the kernel's Gram is of the stored g,
    scoring rows are s(x) g(x), and an all-bad batch still has the row_scale column."""
    adapter = adapters["text"]
    cfg = FeaturizeConfig(measurement="das", projection=ProjectionConfig(k_in=2, k_out=2))
    featurizer = Featurizer(adapter, cfg)
    images = [encode_png(np.full((16, 16, 3), v, dtype=np.uint8)) for v in (30, 120, 220)]
    rows = source_rows(adapter, [(f"e{i}", img, "a cross") for i, img in enumerate(images)])
    result = index_batch(featurizer, rows, "float32")
    table = result.features
    assert "row_scale" in table.column_names
    g, s = featurizer.flat_and_scale(ExampleBatch(example_ids=("e0", "e1", "e2"),
                                                  pixels=torch.stack([torch.from_numpy(decode_image(b, "x", 16, 3))
                                                                      for b in images]),
                                                  captions=("a cross",) * 3))
    layout = featurizer.layout
    np.testing.assert_allclose(flat_matrix(table, layout, scaled=False), g.numpy(), rtol=1e-6)
    np.testing.assert_allclose(flat_matrix(table, layout), (g * s[:, None]).numpy(), rtol=1e-6)
    assert not np.allclose(s.numpy(), s.numpy()[0])  # the scale differs between examples
    gram = partial_gram([table], layout, FULL)["all"]
    np.testing.assert_allclose(gram, g.double().numpy().T @ g.double().numpy(), rtol=1e-5)
    empty = index_batch(featurizer, source_rows(adapter, [("bad", b"\x89PNG broken", "x")]), "float32")
    assert empty.features.schema == table.schema and empty.features.num_rows == 0
