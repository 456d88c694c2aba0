"""The HTTP ingress of the endpoint: a FastAPI app served by the ``AttributionAPI`` deployment.

``POST /v1/attributions`` takes an image (JSON with base64, or multipart) and answers, per
aspect, the k training examples it drew on most; ``GET /v1/index`` describes the served
version and ``GET /healthz`` is the liveness check. Every refusal is a 4xx (or a 503 to
retry) with ``{"error": {"status", "detail"}}`` saying what to change; the work happens in
the featurizer and searcher deployments (``pipelines.serve.deployments``).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations
# (``request: Request``) as objects; as strings, Serve's ingress could not resolve them and would
# take ``request`` for a query parameter (every request a 422).
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from attribution_core.answers import UNIFORM
from attribution_core.config import ServeConfig, from_mapping
from attribution_core.errors import ConfigError, RequestError
from pipelines.serve.messages import FeaturizeItem, PartitionAnswer, QueryFeature, QueryModel, Refusal, SearchItem
from pipelines.serve.protocol import (AnsweredFrom, AttributionRequest, AttributionResponse, IndexDescription,
                                      PartitionDescription, QueryEcho, Timing, merge_partitions, multipart_schema,
                                      plan_queries)

log = logging.getLogger("ray.serve")

API_KEY_HEADER = "X-API-Key"


REFUSALS = {400: {"description": "not an image / undecodable"}, 401: {"description": "API key"},
            409: {"description": "no learned weights for an aspect"}, 413: {"description": "image too large"},
            422: {"description": "bad aspect or k"}, 503: {"description": "index or model being swapped; retry"}}

app = FastAPI(title="Training-data attribution for diffusion models",
              description="Which training images did a generated image draw on: overall (general) and for "
                          "its subject, style and background, from learned per-parameter-group weights.",
              version="1")


def describe(infos: list[dict[str, Any]]) -> IndexDescription:
    """``GET /v1/index`` from every searcher partition's ``info``."""
    first = infos[0]
    return IndexDescription(
        uri=first["uri"], version=first["version"], rows=first["rows"], groups=first["groups"],
        aspects=first["aspects"], weights=first["weights"], answered_by=first["answered_by"], kernel=first["kernel"],
        search=first["search"], search_kernel=first["search_kernel"], model_fingerprint=first["model_fingerprint"],
        created_at=first["created_at"],
        partitions=[PartitionDescription(part=i["part"], rows=i["partition_rows"], version=i["version"],
                                         search=i["search"], search_bytes_per_row=i["search_bytes_per_row"])
                    for i in infos])


def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "detail": detail}}, status_code=status, headers=headers)


async def read_query(request: Request, cfg: ServeConfig) -> tuple[AttributionRequest, bool]:
    """The query a request carries (JSON with a base64 image, or multipart with an image
    file), and whether it named no aspects (the defaults then apply); ``RequestError`` when
    it cannot be read. Both bodies become the same ``AttributionRequest``."""
    limit = cfg.max_image_bytes * 4 // 3 + 65536  # base64 or multipart overhead
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"the request is {int(length):,} bytes; images are limited to "
                                f"{cfg.max_image_bytes:,} bytes (serve.max_image_bytes)")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:  # a malformed multipart body, whatever the parser's error
            raise RequestError(400, f"the multipart body cannot be read ({type(exc).__name__}); send "
                                    "multipart/form-data with an 'image' file, or JSON") from exc
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart requests need the image as a file field named 'image'")
        fields = {"image": await upload.read(), "prompt": form.get("prompt"), "label": form.get("label"),
                  "aspects": form.getlist("aspects") or None, "k": form.get("k")}
    else:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RequestError(400, f"the body is not JSON ({exc}); send JSON with a base64 'image' or "
                                    "multipart/form-data with an 'image' file") from exc
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise RequestError(400, "the JSON body needs 'image': the PNG/JPEG bytes base64-encoded")
        fields = body
    return AttributionRequest.checked(fields, cfg), not fields.get("aspects")


@serve.ingress(app)
class AttributionAPI:
    """Holds handles to the featurizer and to every index searcher partition; a query is
    featurized once per query kind, searched on every partition, and the partitions' top-k
    merged exactly."""

    def __init__(self, featurizer: DeploymentHandle | None, searchers: list[DeploymentHandle], serve_settings: dict[str, Any],
                 model: QueryModel | None = None) -> None:
        """``featurizer``: a handle to the ``QueryFeaturizer`` deployment, or None to hold the
        model here (``model``; the version then comes in this deployment's ``user_config``)."""
        self.featurizer = featurizer
        self.features = None
        if featurizer is None:
            # Imported here, once: an ingress that does not hold the model never loads torch or diffusers.
            from pipelines.serve.featurize import QueryFeatures

            self.features = QueryFeatures(model, "ingress")
        self.searchers = searchers
        self.cfg: ServeConfig = from_mapping(ServeConfig, serve_settings, "serve")
        self.api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if self.cfg.api_key_env and not self.api_key:
            raise ConfigError(f"serve.api_key_env names {self.cfg.api_key_env}, which is not set in the "
                              "endpoint's environment; set it (e.g. from a Secret) or remove serve.api_key_env")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The served version, when this ingress holds the model (``serve.featurize_in: ingress``)."""
        if self.features is not None:
            await self.features.reconfigure(user_config, self._featurize_here)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _featurize_here(self, items: list[FeaturizeItem]) -> list[QueryFeature | Refusal]:
        return await self.features.featurize_async(items)

    def _authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get(API_KEY_HEADER, "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    @app.get("/healthz", summary="Liveness and the served version")
    async def healthz(self):
        try:
            info = await self.searchers[0].info.remote()
        except Exception as exc:
            return error(503, f"the index searchers are not answering ({type(exc).__name__})")
        return {"status": "ok", "version": info["version"]}

    @app.get("/v1/index", summary="The served index: version, rows, groups, aspects with weights")
    async def index_info(self, request: Request):
        if not self._authorized(request):
            return error(401, f"send the API key in the {API_KEY_HEADER} header")
        return describe(await asyncio.gather(*(s.info.remote() for s in self.searchers)))

    @app.post("/v1/attributions", response_model=AttributionResponse,
              summary="Attribute a generated image to training examples", responses=REFUSALS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": AttributionRequest.model_json_schema()},
                  "multipart/form-data": {"schema": multipart_schema()}}}})
    async def attributions(self, request: Request):
        started = time.perf_counter()
        if not self._authorized(request):
            return error(401, f"send the API key in the {API_KEY_HEADER} header")
        try:
            query, defaulted = await read_query(request, self.cfg)
        except RequestError as exc:
            return error(exc.status, exc.detail)
        try:
            return await self._answer(query, defaulted, started)
        except RequestError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return error(exc.status, exc.detail, headers)

    async def _featurize(self, item: FeaturizeItem) -> QueryFeature:
        try:
            if self.features is not None:
                feat = await self._featurize_here(item)
            else:
                feat = await self.featurizer.featurize.remote(item)
        except Exception as exc:
            log.exception("featurizer call failed")
            raise RequestError(503, f"the featurizer is unavailable ({type(exc).__name__}); retry") from exc
        if isinstance(feat, Refusal):
            raise feat.error()
        return feat

    async def _answer(self, query: AttributionRequest, defaulted: bool, started: float) -> AttributionResponse:
        plain, contrast = plan_queries(query.aspects, query.prompt, self.cfg.aspect_query)
        image = FeaturizeItem(image=query.image, prompt=query.prompt, label=query.label)
        asks = ([image] if plain else []) + [dataclasses.replace(image, contrast_aspect=a) for a in contrast]
        feats = await asyncio.gather(*(self._featurize(r) for r in asks))
        searches = ([(feats[0], plain, plain)] if plain else []) + [
            (f, (weighting,), (a,)) for f, (a, weighting) in zip(feats[len(feats) - len(contrast):], contrast.items())]
        merged = {}
        resolved: dict[str, str] = {}
        search_ms, answers = 0.0, []
        for feat, weightings, names in searches:
            item = SearchItem(features=feat.features, spec=feat.spec, aspects=tuple(weightings), k=query.k,
                              fallback=defaulted)
            answers = await self._search(item)
            for name, part in zip(names, merge_partitions(answers, weightings, query.k).values()):
                merged[name] = part
            if names == weightings:
                resolved.update(answers[0].resolved)
            search_ms += max(a.search_ms for a in answers)
        return AttributionResponse(
            index=AnsweredFrom(version=answers[0].version, state=answers[0].key),
            query=QueryEcho(id=feats[0].query_id, prompt=query.prompt, label=query.label,
                            features_cached=all(f.cached for f in feats)),
            k=query.k, aspects={a: merged[a] for a in query.aspects},
            answered_by=resolved,
            substituted={a: used for a, used in resolved.items() if used != a},
            aspect_queries={a: "contrastive" if w == UNIFORM else "contrastive+aspect" for a, w in contrast.items()},
            timing_ms=Timing(featurize=round(max(f.featurize_ms for f in feats), 2), search=round(search_ms, 2),
                             total=round((time.perf_counter() - started) * 1000, 2), featurize_batch=feats[0].batch))

    async def _search(self, item: SearchItem) -> list[PartitionAnswer]:
        """Ask every partition; if they answered from different states (a swap is in
        progress), ask again pinned to the newest state all of them hold."""
        for _ in range(3):
            try:
                answers = await asyncio.gather(*(s.search.remote(item) for s in self.searchers))
            except Exception as exc:
                log.exception("searcher call failed")
                raise RequestError(503, f"an index searcher is unavailable ({type(exc).__name__}); retry") from exc
            refusals = [a for a in answers if isinstance(a, Refusal)]
            if any(r.status != 503 for r in refusals):
                raise next(r for r in refusals if r.status != 503).error()
            keys = {a.key for a in answers if isinstance(a, PartitionAnswer)}
            if not refusals and len(keys) == 1:
                return answers
            common = set.intersection(*(set(a.held) for a in answers))
            if not common:
                break
            item = dataclasses.replace(item, key=max(common))  # keys start with the version: v<seq>-...
        detail = refusals[0].detail if refusals else "the index is being swapped to a new version"
        raise RequestError(503, f"{detail}; retry")
