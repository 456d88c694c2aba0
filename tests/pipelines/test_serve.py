"""The query endpoint over real HTTP on 127.0.0.1: answers, errors, load, hot swap, API key."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from attribution_core.config import FeaturizeConfig, ProjectConfig, from_mapping
from attribution_core.data.images import encode_png
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.features.featurize import Featurizer
from attribution_core.features.query import featurize_images
from attribution_core.index.reader import load_index
from attribution_core.index.scoring import attribute
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import artifact_path, weights_document, weights_matrix
from pipelines.index.job import IndexRequest, run_index
from pipelines.models import load_model_dir
from pipelines.serve.app import ServeArgs
from tests.pipelines.conftest import FEATURIZE
from tests.pipelines.http_client import b64, free_port, get, post, write_config

N = 40
API_KEY_ENV = "ATTRIBUTION_TEST_API_KEY"


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_cluster, model_dirs):
    from pipelines.serve.runner import start, stop

    root = tmp_path_factory.mktemp("serve")
    rows = list(synthetic_rows(N, seed=11, size=16))
    data = str(root / "data")
    write_parquet_dataset(data, rows, SYNTH_SCHEMA, {"kind": "test"}, rows_per_file=16)
    index = str(root / "index")
    # The endpoint searches approximately (serve.search: auto) over an approximate index built
    # for these few rows; every row is a candidate, so answers equal the exact scan's.
    cfg = from_mapping(ProjectConfig, {"featurize": FEATURIZE, "index": {"batch_size": 8, "actors": 2,
                                                                         "kernel": "block_diagonal",
                                                                         "damping_rule": "fixed",
                                                                         "approximate": {"build": "always"}}})
    built = run_index(cfg, IndexRequest(dataset=data, model=model_dirs["text"], out=index))
    store = IndexStore(index)
    manifest = store.latest()
    m = len(manifest.layout["groups"])
    gen = np.random.default_rng(0)
    aspects = {a: {"weights": list(w / w.sum())} for a, w in (("general", gen.random(m)), ("subject", gen.random(m)))}
    aspects["general"].update(answered_by="general", choice={"by": "validation"})  # measured above uniform
    store.write_json(artifact_path(manifest.version, "learned"), weights_document(index, manifest, aspects, {}))
    # The next version (6 images added) is built before serving starts: on 2 CPUs the index
    # job and the endpoint's replicas would compete for CPUs. Serving pins the first one.
    added = [dict(r, example_id=f"added-{i}") for i, r in enumerate(synthetic_rows(6, seed=99, size=16))]
    data2 = str(root / "data2")
    write_parquet_dataset(data2, rows + added, SYNTH_SCHEMA, {"kind": "test"}, rows_per_file=16)
    grown = run_index(cfg, IndexRequest(dataset=data2, model=model_dirs["text"], out=index))
    assert grown["mode"] == "incremental" and grown["rows"] == N + len(added)
    port = free_port()
    config = write_config(root / "serve.yaml", model_dirs["text"], index, port)
    url, info = start(ServeArgs(config=config, version=built["version"]), timeout_s=240)
    try:
        yield {"url": url, "info": info, "index": index, "data": data, "rows": rows, "config": config,
               "version": built["version"], "next_version": grown["version"], "added": added, "root": root,
               "model": model_dirs["text"], "port": port}
    finally:
        stop()


def test_index_info_and_openapi(served):
    from ray import serve

    from pipelines.serve.app import APP_NAME

    # serve.featurize_in: ingress (the default): the ingress holds the model, no featurizer deployment
    assert set(serve.status().applications[APP_NAME].deployments) == {"AttributionAPI", "IndexSearcher0", "IndexSearcher1"}
    status, info = get(served["url"], "/v1/index")
    assert status == 200 and info["version"] == served["version"] and info["rows"] == N
    assert info["aspects"] == ["general", "subject", "uniform"]
    assert sum(p["rows"] for p in info["partitions"]) == N and len(info["partitions"]) == 2
    assert all(p["search"] == "approximate" for p in info["partitions"]), info["partitions"]
    assert get(served["url"], "/healthz") == (200, {"status": "ok", "version": served["version"]})
    status, spec = get(served["url"], "/openapi.json")
    assert status == 200 and "/v1/attributions" in spec["paths"]


def test_answers_equal_offline_scoring_of_the_same_image(served):
    adapter = load_model_dir(served["model"], "cpu")
    loaded = load_index(served["index"], version=served["version"])
    fcfg = from_mapping(FeaturizeConfig, loaded.manifest.featurize)
    featurizer = Featurizer(adapter, fcfg)
    store = IndexStore(served["index"])
    document = store.read_json(artifact_path(loaded.manifest.version, "learned"))
    aspects = ["general", "subject", "uniform"]
    for row in served["rows"][:2] + [dict(served["rows"][5], image=encode_png(np.full((20, 24, 3), 90, np.uint8)))]:
        status, answer = post(served["url"], {"image": b64(row["image"]), "prompt": row["caption"],
                                              "aspects": aspects, "k": 6})
        assert status == 200, answer
        q = featurize_images(featurizer, [row["image"]], prompts=[row["caption"]])
        blocks = [loaded.features[i : i + 16] for i in range(0, N, 16)]
        scores, idx = attribute(q, weights_matrix(document, aspects), loaded.layout, loaded.kernel, blocks=blocks, k=6)
        for a, aspect in enumerate(aspects):
            got = answer["aspects"][aspect]
            assert [r["example_id"] for r in got] == [loaded.example_ids[j] for j in idx[a, 0].tolist()]
            np.testing.assert_allclose([r["score"] for r in got], scores[a, 0].numpy(), rtol=1e-4, atol=1e-7)
            assert sum(r["share"] for r in got) == pytest.approx(1.0)
            assert all(r["caption"] and r["uri"] for r in got)
        assert answer["index"]["version"] == served["version"] and answer["timing_ms"]["total"] > 0


def test_multipart_upload_gives_the_same_answer_as_base64(served):
    row = served["rows"][3]
    boundary = "----attribution-test"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + row["image"] + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{row["caption"]}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="aspects"\r\n\r\nsubject,uniform\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n4\r\n--{boundary}--\r\n'.encode(),
    ]
    status, multipart = post(served["url"], b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, multipart
    _, as_json = post(served["url"], {"image": b64(row["image"]), "prompt": row["caption"],
                                      "aspects": ["subject", "uniform"], "k": 4})
    assert multipart["aspects"] == as_json["aspects"]
    # The same image and prompt again: its features come from the featurizer's cache.
    assert not multipart["query"]["features_cached"] and as_json["query"]["features_cached"]
    assert as_json["timing_ms"]["featurize"] == 0.0 and as_json["query"]["id"] == multipart["query"]["id"]


def big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_requests_get_a_status_and_a_reason(served):
    url, image = served["url"], b64(served["rows"][0]["image"])
    cases = [
        ({"image": b64(b"certainly not an image")}, 400, "not an image"),
        ({"image": "%%%"}, 400, "base64"),
        ({"prompt": "no image"}, 400, "'image'"),
        ({"image": b64(b"\x89PNG" + bytes(60_000))}, 413, "limit"),
        ({"image": b64(big_png(1200))}, 413, "pixels"),
        ({"image": image, "aspects": ["colour"]}, 422, "unknown aspect"),
        ({"image": image, "k": 0}, 422, "k must be"),
        ({"image": image, "k": 21}, 422, "k must be"),
        ({"image": image, "aspects": ["style"]}, 409, "attribution learn-weights"),
    ]
    for body, code, words in cases:
        status, answer = post(url, body)
        assert status == code, (body.keys(), answer)
        assert words in answer["error"]["detail"], answer
    status, answer = post(url, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]["detail"]
    status, answer = post(url, {"image": image})
    assert status == 200 and list(answer["aspects"]) == ["general"] and answer["substituted"] == {}
    assert answer["answered_by"] == {"general": "general"}
    # The replicas took all of that without failing: a good request still works.
    assert post(url, {"image": image, "aspects": ["uniform"], "k": 2})[0] == 200


def raw(url: str, data: bytes, content_type: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{url}/v1/attributions", data=data, method="POST",
                                 headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "fuzzboundary") -> bytes:
    """A multipart body of (name, filename or None, bytes) parts."""
    out = b""
    for name, filename, body in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def fuzz_requests(image: bytes, seed: int = 0) -> list[tuple[bytes, str | None]]:
    """Malformed JSON, bad base64, truncated and header-only images, wrong types for every
    field, huge prompts and wrong content types; then seeded random mixtures of them."""
    from tests.pipelines.test_serve_protocol import png_header

    good = b64(image)
    json_type = "application/json"
    cases: list[tuple[bytes, str | None]] = [(body, json_type) for body in (
        b"", b"{", b"[]", b"null", b"123", b'"image"', b"\xff\xfe\x00", b"NaN", b"[" * 50_000 + b"]" * 50_000)]
    images = ["%%%", "abc", "====", "data:image/png;base64,!!!", b64(image[:30]), b64(image[: len(image) // 2]),
              b64(png_header(16, 16)[:33]), b64(png_header(100_000, 100_000)), b64(b"GIF89a" + bytes(10)), ""]
    values = {"image": [5, None, [good], {"b64": good}, True],
              "prompt": [7, ["a"], {"p": 1}, "x" * 200_000, "\u00e9\u4e2d\U0001f600 ring", "a\x00ring", True],
              "label": [[1], {"l": 2}, 1.5, True, "x" * 10_000, -3],
              "aspects": [3, {"a": 1}, [1, 2], [["style"]], "colour", ",,,", ["general"] * 1000],
              "k": ["ten", 2.5, [3], {"k": 1}, True, -1, 0, 10**30, 1e308]}
    cases += [(json.dumps({"image": i}).encode(), json_type) for i in images]
    for field, bad in values.items():
        cases += [(json.dumps({"image": good, field: v} if field != "image" else {field: v}).encode(), json_type)
                  for v in bad]
    body = json.dumps({"image": good}).encode()
    cases += [(body, t) for t in ("text/plain", "application/xml", "application/x-www-form-urlencoded", None)]
    cases += [(b"<xml/>", "application/xml"), (b"image=abc", "application/x-www-form-urlencoded")]
    form = "multipart/form-data; boundary=fuzzboundary"
    cases += [(multipart([("prompt", None, b"a ring")]), form), (multipart([("image", None, b"not a file")]), form),
              (multipart([("image", "q.png", image[:40])]), form), (multipart([("image", "q.png", b"")]), form),
              (multipart([("image", "q.png", image), ("k", None, b"abc")]), form),
              (multipart([("image", "q.png", image), ("aspects", None, b"colour")]), form),
              (b"--fuzzboundary\r\ngarbage", form), (b"", form), (multipart([("image", "q.png", image)]),
                                                                  "multipart/form-data")]
    rng = np.random.default_rng(seed)
    for _ in range(40):  # random mixtures of the bad values, several fields at once
        mix = {f: vs[int(rng.integers(len(vs)))] for f, vs in values.items() if rng.random() < 0.6}
        mix.setdefault("image", images[int(rng.integers(len(images)))] if rng.random() < 0.5 else good)
        cases.append((json.dumps(mix).encode(), json_type))
    return cases


def test_fuzzed_requests_get_4xx_never_5xx_and_the_endpoint_stays_healthy(served):
    url, image = served["url"], served["rows"][0]["image"]
    cases = fuzz_requests(image)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda case: raw(url, *case), cases))
    for (body, content_type), (status, text) in zip(cases, answers):
        assert status < 500, (content_type, body[:200], status, text[:300])
        if status >= 400:  # every refusal says what to change, in the one error format
            error = json.loads(text)["error"]
            assert error["status"] == status and len(error["detail"]) > 10, text[:300]
    assert sum(status == 200 for status, _ in answers) >= 3  # fuzzed values the endpoint does accept
    assert get(url, "/healthz")[0] == 200
    assert post(url, {"image": b64(image), "aspects": ["uniform"], "k": 2})[0] == 200


def fire(url: str, bodies: list[dict], concurrency: int) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda b: post(url, b), bodies))


def test_200_requests_at_concurrency_8_all_succeed(served):
    bodies = [{"image": b64(r["image"]), "prompt": r["caption"], "aspects": ["general", "uniform"], "k": 5}
              for r in (served["rows"][i % N] for i in range(200))]
    results = fire(served["url"], bodies, 8)
    assert [s for s, _ in results] == [200] * 200
    # Answers under load (batched with others) equal answers alone, up to float32 rounding.
    alone = post(served["url"], bodies[7])[1]
    for aspect, rows in alone["aspects"].items():
        loaded = results[7][1]["aspects"][aspect]
        assert [r["example_id"] for r in loaded] == [r["example_id"] for r in rows]
        np.testing.assert_allclose([r["score"] for r in loaded], [r["score"] for r in rows], rtol=1e-4)
    assert max(a["timing_ms"]["featurize_batch"] for _, a in results) > 1  # concurrent queries were batched


def test_hot_swap_to_a_new_version_under_load_drops_nothing(served):
    from pipelines.serve.runner import deploy, wait_ready

    added, new_version = served["added"], served["next_version"]

    query = {"image": b64(added[0]["image"]), "prompt": added[0]["caption"], "aspects": ["uniform"], "k": 3}
    results: list[tuple[int, dict]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            results.append(post(served["url"], query))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        deploy(ServeArgs(config=served["config"]), "127.0.0.1", served["port"], version=new_version)
        wait_ready(served["url"], 180, version=new_version)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and [s for s, _ in results if s != 200] == [], [a for s, a in results if s != 200][:3]
    versions = [a["index"]["version"] for _, a in results]
    assert versions[0] == served["version"] and versions[-1] == new_version
    # The new version answers with the added image itself first; the old one could not.
    assert results[-1][1]["aspects"]["uniform"][0]["example_id"] == "added-0"
    # Weights of the earlier version (same features) still serve the grown index.
    status, info = get(served["url"], "/v1/index")
    assert info["version"] == new_version and info["weights"]["learned_on"] == served["version"]


def test_api_key_is_enforced_when_configured(served, monkeypatch, tmp_path):
    from pipelines.serve.runner import deploy, wait_ready

    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    config = write_config(tmp_path / "keyed.yaml", served["model"], served["index"], served["port"],
                          api_key_env=API_KEY_ENV)
    deploy(ServeArgs(config=config), "127.0.0.1", served["port"])
    deadline = time.monotonic() + 240
    while get(served["url"], "/v1/index")[0] != 401:  # the keyed application has replaced the open one
        assert time.monotonic() < deadline, "the keyed application did not come up"
        time.sleep(0.5)
    wait_ready(served["url"], 240, api_key="s3cret-key")
    body = {"image": b64(served["rows"][0]["image"]), "aspects": ["uniform"], "k": 2}
    assert post(served["url"], body)[0] == 401
    assert post(served["url"], body, {"X-API-Key": "wrong"})[0] == 401
    assert post(served["url"], body, {"X-API-Key": "s3cret-key"})[0] == 200
    assert get(served["url"], "/v1/index")[0] == 401
    assert get(served["url"], "/healthz")[0] == 200


def test_contrastive_aspect_queries_equal_offline_scoring(served, tmp_path):
    """serve.aspect_query 'both': subject is answered from Concept-TRAK's feature of the
    prompt against the prompt without its subject, under the subject weights; general still
    from the plain feature. Featurized by a QueryFeaturizer deployment (serve.featurize_in:
    replicas) where the other tests featurize in the ingress."""
    from ray import serve

    from attribution_core.data.captions import without_concept
    from pipelines.serve.app import APP_NAME
    from pipelines.serve.runner import deploy

    config = write_config(tmp_path / "contrast.yaml", served["model"], served["index"], served["port"],
                          aspect_query="both", featurize_in="replicas")
    deploy(ServeArgs(config=config), "127.0.0.1", served["port"])
    row = served["rows"][2]
    body = {"image": b64(row["image"]), "prompt": row["caption"], "aspects": ["general", "subject"], "k": 5}
    deadline, status, answer = time.monotonic() + 240, 0, {}
    while not (status == 200 and answer.get("aspect_queries")):  # until the new application answers
        assert time.monotonic() < deadline, (status, answer)
        time.sleep(0.5)
        try:
            status, answer = post(served["url"], body)
        except OSError:  # the proxy is between applications
            status, answer = 0, {}
    assert answer["aspect_queries"] == {"subject": "contrastive+aspect"}
    assert "QueryFeaturizer" in serve.status().applications[APP_NAME].deployments
    loaded = load_index(served["index"], version=answer["index"]["version"])
    featurizer = Featurizer(load_model_dir(served["model"], "cpu"), from_mapping(FeaturizeConfig, loaded.manifest.featurize))
    values = {a: list(p.values) for a, p in ProjectConfig().weights.prompts.items()}
    without = without_concept(row["caption"], "subject", values)
    assert without != row["caption"]
    q = featurize_images(featurizer, [row["image"]], prompts=[row["caption"]], contrast=[without])
    document = IndexStore(served["index"]).read_json(artifact_path(served["version"], "learned"))
    blocks = [loaded.features[i : i + 16] for i in range(0, loaded.features.shape[0], 16)]
    scores, idx = attribute(q, weights_matrix(document, ["subject"]), loaded.layout, loaded.kernel, blocks=blocks, k=5)
    got = answer["aspects"]["subject"]
    assert [r["example_id"] for r in got] == [loaded.example_ids[j] for j in idx[0, 0].tolist()]
    np.testing.assert_allclose([r["score"] for r in got], scores[0, 0].numpy(), rtol=1e-4, atol=1e-7)
    plain = featurize_images(featurizer, [row["image"]], prompts=[row["caption"]])
    _, general = attribute(plain, weights_matrix(document, ["general"]), loaded.layout, loaded.kernel, blocks=blocks,
                           k=5)
    assert [r["example_id"] for r in answer["aspects"]["general"]] == [loaded.example_ids[j] for j in general[0, 0].tolist()]
    # A prompt that names no subject cannot be contrasted: 422 saying so.
    status, refused = post(served["url"], {**body, "prompt": "a striped shape"})
    assert status == 422 and "names no subject" in refused["error"]["detail"]
