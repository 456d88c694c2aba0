"""Synthetic dataset, readers for both layouts (local and s3://), decoding."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from attribution_core.data.images import ImageDecodeError, decode_image, encode_png
from attribution_core.data.readers import detect_layout, read_examples
from attribution_core.data.synthetic import BACKGROUNDS, STYLES, SUBJECTS, is_held_out
from attribution_core.data.writers import read_marker, write_synthetic
from attribution_core.errors import ConfigError, InputError

HOLDOUT = ((("subject", "ring"), ("style", "striped")), (("background", "grid"), ("subject", "triangle")))


def _rows(uri):
    return [(e.example_id, e.image, e.caption, e.attributes) for e in read_examples(uri)]


def test_same_seed_same_bytes_and_holdout(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), 300, seed=5, size=32, holdout=HOLDOUT, rows_per_file=128)
    write_synthetic(str(tmp_path / "b"), 300, seed=5, size=32, holdout=HOLDOUT, rows_per_file=128)
    write_synthetic(str(tmp_path / "c"), 300, seed=6, size=32, holdout=HOLDOUT, rows_per_file=128)
    assert a["rows"] == 300 and read_marker(str(tmp_path / "a"))["files"] == 3
    for name in ("part-00000.parquet", "part-00002.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows, other = _rows(str(tmp_path / "a")), _rows(str(tmp_path / "c"))
    assert [r[1] for r in rows] != [r[1] for r in other]
    assert len({r[1] for r in rows}) == 300, "two images are identical"
    attrs = [r[3] for r in rows]
    assert not any(is_held_out(a, HOLDOUT) for a in attrs)
    assert {a["subject"] for a in attrs} == set(SUBJECTS) and len(SUBJECTS) >= 6
    assert {a["style"] for a in attrs} == set(STYLES) and len(STYLES) >= 4
    assert {a["background"] for a in attrs} == set(BACKGROUNDS) and len(BACKGROUNDS) >= 4
    ex = rows[0]
    assert ex[2] == f"{'an' if ex[3]['style'][0] in 'aeiou' else 'a'} {ex[3]['style']} {ex[3]['subject']} on a {ex[3]['background']} background"


def test_writer_refuses_to_mix_and_bad_holdout(tmp_path):
    write_synthetic(str(tmp_path / "a"), 4, seed=0)
    with pytest.raises(ConfigError, match="already holds a dataset"):
        write_synthetic(str(tmp_path / "a"), 4, seed=1)
    with pytest.raises(ConfigError, match="holdout subject 'star'"):
        write_synthetic(str(tmp_path / "b"), 4, seed=0, holdout=((("subject", "star"),),))


def _image_folder(root, n=5, mode="RGB", size=(24, 20)):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (i + 1) % 255).astype(np.uint8)
        Image.fromarray(arr).convert(mode).save(root / f"img{i}.png")
        lines.append(json.dumps({"file_name": f"img{i}.png", "text": f"picture {i}", "label": i % 2}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_round_trip(tmp_path):
    root = _image_folder(tmp_path / "folder")
    assert detect_layout(str(root)) == "imagefolder"
    rows = list(read_examples(str(root)))
    assert [r.example_id for r in rows] == [f"img{i}.png" for i in range(5)]
    assert rows[2].caption == "picture 2" and rows[2].attributes == {"label": 0}
    assert rows[2].image == (root / "img2.png").read_bytes()
    px = decode_image(rows[0].image, rows[0].example_id, 16, 3)  # 24x20 -> centre crop 20x20 -> 16x16
    assert px.shape == (3, 16, 16) and px.dtype == np.float32 and -1 <= px.min() and px.max() <= 1
    assert decode_image(rows[0].image, "x", 8, 1).shape == (1, 8, 8)


def test_parquet_with_huggingface_image_struct_and_no_ids(tmp_path):
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    table = pa.table({"image": [{"bytes": png, "path": "a.png"}], "text": ["hello"]})
    pq.write_table(table, tmp_path / "d.parquet")
    (ex,) = read_examples(str(tmp_path / "d.parquet"))
    assert ex.image == png and ex.caption == "hello" and len(ex.example_id) == 32


def test_bad_images_name_the_example(tmp_path):
    with pytest.raises(ImageDecodeError, match="'broken-7'.*cannot decode"):
        decode_image(b"not an image", "broken-7", 16, 3)
    with pytest.raises(ImageDecodeError, match="'empty-1'.*no image bytes"):
        decode_image(b"", "empty-1", 16, 3)
    root = _image_folder(tmp_path / "folder", n=2)
    (root / "img1.png").unlink()
    rows = list(read_examples(str(root)))
    with pytest.raises(ImageDecodeError, match="img1.png"):
        decode_image(rows[1].image, rows[1].example_id, 16, 3)
    with pytest.raises(InputError, match="no image column 'image'"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "noimg.parquet")
        list(read_examples(str(tmp_path / "noimg.parquet")))
    with pytest.raises(InputError, match="does not exist"):
        detect_layout(str(tmp_path / "missing"))


def test_s3_round_trip_both_layouts(tmp_path, s3_base):
    local = str(tmp_path / "local")
    write_synthetic(local, 40, seed=1, size=16, rows_per_file=16)
    write_synthetic(f"{s3_base}/synth", 40, seed=1, size=16, rows_per_file=16)
    assert detect_layout(f"{s3_base}/synth") == "parquet"
    assert _rows(f"{s3_base}/synth") == _rows(local)
    assert read_marker(f"{s3_base}/synth")["rows"] == 40
    # An image folder uploaded to s3://.
    from attribution_core.data.storage import filesystem_for, write_bytes

    root = _image_folder(tmp_path / "folder", n=3)
    fs, path = filesystem_for(f"{s3_base}/folder")
    for f in root.iterdir():
        write_bytes(fs, f"{path}/{f.name}", f.read_bytes())
    assert detect_layout(f"{s3_base}/folder") == "imagefolder"
    got = [(r.example_id, r.image, r.caption) for r in read_examples(f"{s3_base}/folder")]
    assert got == [(r.example_id, r.image, r.caption) for r in read_examples(str(root))]


def test_texture_set_is_deterministic_labelled_and_unlike_the_shapes(tmp_path):
    """The second benchmark's data: same seed, same bytes; every class drawn; a label and no
    caption; pixel statistics the shapes set does not have (many distinct colours per image)."""
    from attribution_core.config import ProjectConfig, from_mapping
    from attribution_core.data.textures import TEXTURES, draw_texture
    from attribution_core.data.synthetic import draw_example

    a = write_synthetic(str(tmp_path / "a"), 60, seed=2, size=16, kind="textures")
    write_synthetic(str(tmp_path / "b"), 60, seed=2, size=16, kind="textures")
    ta, tb = pq.read_table(str(tmp_path / "a")), pq.read_table(str(tmp_path / "b"))
    assert ta.equals(tb) and a["set"] == "textures" and read_marker(str(tmp_path / "a"))["set"] == "textures"
    assert ta.column_names == ["example_id", "image", "label"]
    assert set(ta.column("label").to_pylist()) == set(TEXTURES)
    examples = list(read_examples(str(tmp_path / "a")))
    assert len(examples) == 60 and all(e.caption is None for e in examples)
    colours = np.mean([len(np.unique(draw_texture(2, i, 16).image.reshape(-1, 3), axis=0)) for i in range(20)])
    shapes = np.mean([len(np.unique(draw_example(2, i, 16).image.reshape(-1, 3), axis=0)) for i in range(20)])
    assert colours > 100 > shapes
    with pytest.raises(ConfigError, match="textures set has none"):
        write_synthetic(str(tmp_path / "c"), 4, seed=0, holdout=((("subject", "ring"),),), kind="textures")
    with pytest.raises(ConfigError, match="data.synthetic.kind"):
        from_mapping(ProjectConfig, {"data": {"synthetic": {"kind": "faces"}}})
