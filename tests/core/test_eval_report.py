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
    lds = {b: {"uniform": 0.1 + i / 10, "learned": 0.15 + i / 10, "uniform_ci": [0.05, 0.2], "learned_ci": [0.1, 0.3],
               "weights": {"io": 0.4, "cross_attn_k": 0.6}} for i, b in enumerate(("tracin", "trak", "dtrak"))}
    recall = {"subject": {"aspect": 0.5, "general": 0.6, "uniform": 0.4, "pixel_knn": 0.2},
              "style": {"aspect": 0.7, "general": 0.65, "uniform": 0.6, "pixel_knn": float("nan")}}
    gallery = [{"prompt": f"a striped circle {q}", "attributes": {"subject": "circle", "style": "striped"},
                "image": _image(q), "rankings": {name: [{"example_id": f"ex{j}", "caption": f"caption {j}",
                                                         "score": 1.0 / (j + 1), "image": _image(100 + j),
                                                         "shares": ["subject"][: j % 2]} for j in range(3)]
                                                 for name in ("general", "subject", "uniform")}}
               for q in range(2)]
    metrics = {"lds": lds, "recall_at_10": recall, "n_subsets": 32, "n_queries": 20,
               "info": {"index": "artifacts/demo/index", "version": "v00001-abc", "n_train": 256, "recall_k": 10,
                        "recall_queries": 48, "output": "negative loss", "query_mix": "12 generated, 8 held-out real"}}
    return metrics, gallery


def test_report_is_self_contained_and_lists_every_number():
    metrics, gallery = _metrics()
    page = render_report(metrics, gallery)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)  # nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") == 2 * (1 + 3 * 3)  # each query and its 3 x 3 ranked images
    for basis in ("TracIn", "TRAK", "D-TRAK"):
        assert basis in page
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
