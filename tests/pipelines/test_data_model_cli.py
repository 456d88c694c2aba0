"""`attribution data synth`, `train-model`, `generate` and `bench model-quality`, as a user
runs them (small settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from attribution_core.data.readers import read_examples
from tests.pipelines.test_cli import ROOT, attribution


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["train"].update(resolution=8, widths=[8, 16], text_width=16, batch_size=16, steps=6, warmup_steps=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_synth_train_generate_quality(tmp_path):
    data = tmp_path / "data"
    out = json.loads(attribution("data", "synth", "--out", str(data), "--n", "48", "--size", "16",
                                 "--holdout", "subject=ring,style=striped", "--json").stdout)
    assert out["rows"] == 48 and out["holdout"] == [{"subject": "ring", "style": "striped"}]
    assert not any(e.attributes["subject"] == "ring" and e.attributes["style"] == "striped"
                   for e in read_examples(str(data)))

    model = tmp_path / "model"
    trained = json.loads(attribution("train-model", "--config", str(_config(tmp_path)), "--data", str(data),
                                     "--out", str(model), "--json").stdout)
    assert trained["steps"] == 6 and (model / "training.json").is_file()
    assert not list(tmp_path.glob(".model.tmp-*")), "the temporary directory was left behind"
    again = attribution("train-model", "--config", str(_config(tmp_path)), "--data", str(data), "--out", str(model),
                        check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr

    gen = tmp_path / "gen"
    attribution("generate", "--model", str(model), "--prompt", "a filled circle on a grid background",
                "--n", "3", "--seed", "7", "--steps", "3", "--out", str(gen))
    gen2 = tmp_path / "gen2"
    attribution("generate", "--model", str(model), "--prompt", "a filled circle on a grid background",
                "--n", "3", "--seed", "7", "--steps", "3", "--out", str(gen2))
    t1, t2 = (pq.read_table(p / "part-00000.parquet") for p in (gen, gen2))
    assert t1.column("image").to_pylist() == t2.column("image").to_pylist()
    assert t1.column("seed").to_pylist() == [7, 7, 7] and t1.column("index").to_pylist() == [0, 1, 2]

    quality = json.loads(attribution("bench", "model-quality", "--model", str(model), "--combos", "2",
                                     "--per-combo", "2", "--steps", "3", "--classifier-epochs", "1", "--json").stdout)
    for key in ("subject", "style", "background"):
        assert 0.0 <= quality[key] <= 1.0
    assert quality["n"] == 8 and quality["held_out"]["n"] == 4


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_synth_to_s3(tmp_path, s3_base):
    import os

    uri = f"{s3_base}/cli-synth"
    attribution("data", "synth", "--out", uri, "--n", "5", "--size", "16")
    assert len(list(read_examples(uri))) == 5
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
