"""Request checks of the endpoint that run before any decoding (no Ray needed)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from attribution_core.config_serve import ServeConfig
from pipelines.serve.protocol import FeatureCache, RequestError, build_query, check_image


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


def test_feature_cache_keys_on_content_and_drops_the_least_recently_used():
    item = {"image": b"png-bytes", "prompt": "a red circle", "label": None}
    key = FeatureCache.key("spec-a", item)
    assert key == FeatureCache.key("spec-a", dict(item))
    others = [FeatureCache.key("spec-b", item), FeatureCache.key("spec-a", {**item, "image": b"png-bytez"}),
              FeatureCache.key("spec-a", {**item, "prompt": "a red square"}),
              FeatureCache.key("spec-a", {**item, "label": 3}),
              FeatureCache.key("spec-a", {**item, "contrast_aspect": "style"}),
              FeatureCache.key("spec-a", {**item, "prompt": None, "label": "a red circle"})]
    assert len({key, *others}) == 1 + len(others)
    cache = FeatureCache(2)
    cache.put("a", {"v": 1})
    cache.put("b", {"v": 2})
    assert cache.get("a") == {"v": 1}  # a is now the most recent
    cache.put("c", {"v": 3})
    assert cache.get("b") is None and cache.get("a") == {"v": 1} and cache.get("c") == {"v": 3}
    assert (cache.hits, cache.misses) == (3, 1)
    off = FeatureCache(0)
    off.put("a", {"v": 1})
    assert off.get("a") is None
