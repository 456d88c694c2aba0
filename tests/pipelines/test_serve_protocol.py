"""Request checks of the endpoint that run before any decoding (no Ray needed)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from attribution_core.config_serve import ServeConfig
from pipelines.serve.messages import FeatureCache, FeaturizeItem, QueryFeature
from pipelines.serve.protocol import AttributionRequest, RequestError, build_query, check_image, multipart_schema


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds almost none of them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5_000, 100_000])  # over serve.max_image_pixels; over PIL's bomb limit too
def test_an_image_declaring_too_many_pixels_is_413(side):
    with pytest.raises(RequestError) as caught:
        check_image(png_header(side, side), ServeConfig())
    assert caught.value.status == 413 and "serve.max_image_pixels" in str(caught.value)


def test_a_truncated_image_is_400():
    with pytest.raises(RequestError) as caught:
        check_image(png_header(16, 16)[:20], ServeConfig())
    assert caught.value.status == 400


@pytest.mark.parametrize("prompt, label, aspects, k, status", [
    (123, None, None, None, 422), (["a", "ring"], None, None, None, 422), ("x" * 1001, None, None, None, 422),
    (None, {"name": 1}, None, None, 422), (None, True, None, None, 422), (None, None, [1, [2]], None, 422),
    (None, None, None, True, 422), (None, None, None, 1e300, 422), (None, None, None, [3], 422),
    (None, None, None, 2.5, 422), (None, None, None, "ten", 422),
])
def test_wrong_types_are_422_naming_the_field(prompt, label, aspects, k, status):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    with pytest.raises(RequestError) as caught:
        build_query(buf.getvalue(), prompt, label, aspects, k=k, cfg=ServeConfig())
    assert caught.value.status == status
    assert len(str(caught.value)) < 300  # the client's value is quoted, not echoed whole


def _feature(tag: int) -> QueryFeature:
    return QueryFeature(features=np.full(3, tag, np.float32), spec="spec-a", query_id=f"q{tag}", featurize_ms=1.0,
                        batch=1)


def test_feature_cache_keys_on_content_and_drops_the_least_recently_used():
    item = FeaturizeItem(image=b"png-bytes", prompt="a red circle", label=None)
    key = FeatureCache.key("spec-a", item)
    assert key == FeatureCache.key("spec-a", FeaturizeItem(image=b"png-bytes", prompt="a red circle", label=None))
    others = [FeatureCache.key("spec-b", item), FeatureCache.key("spec-a", replace(item, image=b"png-bytez")),
              FeatureCache.key("spec-a", replace(item, prompt="a red square")),
              FeatureCache.key("spec-a", replace(item, label=3)),
              FeatureCache.key("spec-a", replace(item, contrast_aspect="style")),
              FeatureCache.key("spec-a", replace(item, prompt=None, label="a red circle"))]
    assert len({key, *others}) == 1 + len(others)
    cache = FeatureCache(2)
    cache.put("a", _feature(1))
    cache.put("b", _feature(2))
    assert cache.get("a").query_id == "q1"  # a is now the most recent
    cache.put("c", _feature(3))
    assert cache.get("b") is None and cache.get("a").query_id == "q1" and cache.get("c").query_id == "q3"
    assert (cache.hits, cache.misses) == (3, 1)
    off = FeatureCache(0)
    off.put("a", _feature(1))
    assert off.get("a") is None


def test_one_request_model_documents_json_and_multipart_and_checks_both():
    """The request is declared once: both content types' schemas come from it, and a JSON
    body and a multipart body with the same fields check to the same request."""
    json_schema, form_schema = AttributionRequest.model_json_schema(), multipart_schema()
    assert set(json_schema["properties"]) == set(form_schema["properties"]) == {"image", "prompt", "label",
                                                                                 "aspects", "k"}
    assert json_schema["required"] == form_schema["required"] == ["image"]
    assert json_schema["properties"]["image"]["contentEncoding"] == "base64"
    assert form_schema["properties"]["image"]["format"] == "binary"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    png, cfg = buf.getvalue(), ServeConfig()
    from_json = AttributionRequest.checked({"image": base64.b64encode(png).decode(), "prompt": "a ring",
                                            "aspects": ["style", "general"], "k": 3, "unknown": 1}, cfg)
    from_form = AttributionRequest.checked({"image": png, "prompt": "a ring", "aspects": ["style,general"],
                                            "k": "3", "label": ""}, cfg)
    assert from_json == from_form and from_json.aspects == ("style", "general") and from_json.k == 3
    defaults = AttributionRequest.checked({"image": png}, cfg)
    assert defaults.aspects == tuple(cfg.default_aspects) and defaults.k == cfg.default_k
    for fields, status in (({"image": 5}, 400), ({"image": png, "aspects": {"a": 1}}, 422),
                           ({"image": "%%%", "k": 0}, 400), ({"image": png, "k": 0, "prompt": 5}, 422)):
        with pytest.raises(RequestError) as caught:
            AttributionRequest.checked(fields, cfg)
        assert caught.value.status == status
    with pytest.raises(TypeError, match="ServeConfig"):  # the limits are not optional
        AttributionRequest.model_validate({"image": png})
