"""The evaluation report: self-contained HTML that a browser renders (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attribution_core.data.images import encode_png
from attribution_core.evaluation.report import render_report

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _image(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8))


def _metrics() -> tuple[dict, list]:
    labels = {"tracin": "TracIn-CP: loss gradients", "trak": "TRAK: loss gradients, kernel",
              "dtrak": "D-TRAK: squared-output-norm gradients, kernel"}
    lds = {b: {"label": labels[b], "uniform": 0.1 + i / 10, "learned": 0.15 + i / 10, "uniform_ci": [0.05, 0.2],
               "learned_ci": [0.1, 0.3], "difference": 0.05, "difference_ci": [-0.01, 0.11],
               "served": {"weighting": "uniform", "lds": 0.1 + i / 10, "ci": [0.05, 0.2],
                          "cross_fitted": {"lds": 0.1 + i / 10, "ci": [0.04, 0.21]}},
               "weights": {"io": 0.4, "cross_attn_k": 0.6}} for i, b in enumerate(("tracin", "trak", "dtrak"))}
    recall = {"subject": {"aspect": 0.5, "general": 0.6, "uniform": 0.4, "pixel_knn": 0.2},
              "style": {"aspect": 0.7, "general": 0.65, "uniform": 0.6, "pixel_knn": float("nan")}}
    gallery = [{"prompt": f"a striped circle {q}", "attributes": {"subject": "circle", "style": "striped"},
                "image": _image(q), "rankings": {name: [{"example_id": f"ex{j}", "caption": f"caption {j}",
                                                         "score": 1.0 / (j + 1), "image": _image(100 + j),
                                                         "shares": ["subject"][: j % 2]} for j in range(3)]
                                                 for name in ("general", "subject", "uniform")}}
               for q in range(2)]
    published = {"dtrak-4096": {"label": "D-TRAK as published (4,096 dimensions)", "lds": 0.21, "ci": [0.15, 0.27],
                                "dampings": [10.0, 20.0], "oracle": {"damping": 10.0, "lds": 0.22},
                                "bytes_per_row": 8192, "featurize_s_per_row": 0.12, "ours_featurize_s_per_row": 0.01,
                                "versus": {"dtrak": [0.09, 0.03, 0.15]},
                                "paper_setting": {"difference": -0.004, "difference_ci": [-0.02, 0.01]}}}
    frontier = {"settings": {"default": {"bytes_per_row": 10624, "featurize_s_per_row": 0.01,
                            "bases": {"dtrak": {"uniform": 0.3, "served_lds": 0.3, "served_ci": [0.25, 0.35]}}},
                "timesteps-50": {"bytes_per_row": 10624, "featurize_s_per_row": 0.05,
                                 "bases": {"dtrak": {"uniform": 0.33, "served_lds": 0.33, "served_ci": [0.27, 0.39],
                                                    "versus_published": {"dtrak-4096": [0.12, 0.05, 0.19]}}}}},
                "selection": {"basis": "dtrak", "chosen": "timesteps-50"}}
    metrics = {"lds": lds, "recall_at_10": recall, "n_subsets": 32, "n_queries": 20, "lds_published": published,
               "lds_frontier": frontier, "lds_noise_ceiling": {"replica_seed": 1, "agreement": 0.61, "ci": [0.55, 0.66],
                                                               "ceiling": 0.78},
               "info": {"index": "artifacts/demo/index", "version": "v00001-abc", "n_train": 256, "recall_k": 10,
                        "recall_queries": 48, "output": "negative loss", "query_mix": "12 generated, 8 held-out real",
                        "answered_by": {"general": "uniform", "subject": "general"},
                        "choices": {"general": {"by": "lds", "basis": "dtrak", "gains": {"general": [-0.09, -0.14, -0.04]}},
                                    "subject": {"by": "validation", "gains": {"subject": [0.1, 0.02, 0.2]}}}}}
    return metrics, gallery


def test_report_is_self_contained_and_lists_every_number():
    metrics, gallery = _metrics()
    page = render_report(metrics, gallery)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)  # nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") == 2 * (1 + 3 * 3)  # each query and its 3 x 3 ranked images
    for basis in ("TracIn-CP", "TRAK", "D-TRAK"):  # each basis says what it computes
        assert basis in page
    assert "What the endpoint serves" in page and "LDS of dtrak: general &minus; uniform -0.090" in page
    assert "every 95% interval resamples queries and subsets" in page
    assert "D-TRAK as published (4,096 dimensions)" in page and "120.0 / 10.0" in page  # featurize ms: it / ours
    assert "Noise ceiling" in page and "0.610" in page and "timesteps-50" in page and "Featurizer frontier" in page
    assert "dtrak &minus; dtrak-4096: +0.120" in page  # a setting against the published row, paired
    assert "0.250" in page and "[0.100, 0.300]" in page  # trak learned and its interval
    assert "n/a" in page  # a missing number is said, not hidden
    assert "Aspect Recall@10" in page and "pixel kNN" in page and "a striped circle 1" in page


def test_report_without_recall_says_why():
    metrics, _ = _metrics()
    metrics["recall_at_10"] = {}
    metrics["info"]["recall_skipped"] = "the model is none-conditioned"
    page = render_report(metrics, [])
    assert "Not measured: the model is none-conditioned" in page and "Gallery" not in page


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (`make test` installs Debian's chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    metrics, gallery = _metrics()
    page = tmp_path / "report.html"
    page.write_text(render_report(metrics, gallery))
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1200)
    colours = {tuple(c) for c in image.reshape(-1, 3)[:: 7]}
    assert len(colours) > 200  # text, tables and the decoded gallery images, not a blank or error page
    # The gallery's random-noise images decode: a region below the tables is highly varied.
    lower = image[700:, :, :].reshape(-1, 3)
    assert np.unique(lower, axis=0).shape[0] > 500
    Path(shot).rename(tmp_path / "report.png")
