"""The application: FastAPI ingress + featurizer + index searchers, from one typed builder.

``build_app(ServeArgs(...))`` is what ``attribution serve`` runs and what
``deploy/serve_config.yaml`` names (``import_path: pipelines.serve.app:build_app``, with
``args`` validated into ``ServeArgs``). Nothing happens at import time: the FastAPI app and
the ingress class are made inside the builder.

Hot swap: the index version and weights travel in each deployment's ``user_config``.
Deploying the same application config again with only those changed (``serve deploy`` of
the edited ``deployments:`` section, or ``pipelines.serve.runner.deploy``) is a lightweight
update: Serve calls ``reconfigure`` on the running replicas instead of replacing them.
Changing ``args`` rebuilds the application (new replicas, rolling).
"""


import asyncio
import hmac
import json
import logging
import os
import time
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from attribution_core.config import ProjectConfig, to_mapping

log = logging.getLogger("ray.serve")

API_KEY_HEADER = "X-API-Key"
APP_NAME = "attribution"
IMPORT_PATH = "pipelines.serve.app:build_app"


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` of a Serve config file)."""

    config: str = Field(description="Project config file (its serve: section sets limits, replicas, batching).")
    index: str | None = Field(None, description="Index root (path or s3://); default: the config's index.out.")
    version: str | None = Field(None, description="Index version to serve; default: the index's latest.")
    weights: str | None = Field(None, description="Weights artifact URI; default: <index>/versions/<v>/weights/"
                                                   "<serve.weights>.json, else the nearest earlier version's.")
    model: str | None = Field(None, description="Model directory; default: the config's model.path.")


class AttributionRequest(BaseModel):
    """JSON body of POST /v1/attributions (multipart/form-data takes the same fields, the image as a file)."""

    image: str = Field(description="PNG or JPEG bytes, base64-encoded (a data: URL is accepted).")
    prompt: str | None = Field(None, description="The prompt the image was generated from (text-to-image models).")
    label: str | int | None = Field(None, description="Class name or index (class-conditional models).")
    aspects: list[str] | None = Field(None, description="Any of general, subject, style, background, uniform.")
    k: int | None = Field(None, description="Training examples per aspect.")


class Attribution(BaseModel):
    rank: int
    example_id: str
    score: float
    share: float = Field(description="max(score, 0) / the sum of max(score, 0) over the k returned.")
    uri: str
    caption: str


class AttributionResponse(BaseModel):
    index: dict[str, Any]
    query: dict[str, Any]
    k: int
    aspects: dict[str, list[Attribution]]
    substituted: dict[str, str] = Field(default_factory=dict,
                                        description="Default aspects answered with uniform weights (none learned).")
    aspect_queries: dict[str, str] = Field(default_factory=dict, description=(
        "Aspects answered from Concept-TRAK's contrastive query feature (serve.aspect_query): 'contrastive' "
        "(uniform weights) or 'contrastive+aspect' (the aspect's weights)."))
    timing_ms: dict[str, float]


def user_config(cfg: ProjectConfig, args: ServeArgs) -> dict[str, Any]:
    """What each deployment may swap while serving: index, version, weights (+ batching, and
    how often to follow the index's ``latest`` when no version is pinned)."""
    return {"index": args.index or cfg.index.out, "version": args.version, "weights": args.weights,
            "weights_name": cfg.serve.weights, "max_batch_size": cfg.serve.max_batch_size,
            "batch_wait_ms": cfg.serve.batch_wait_ms, "refresh_s": cfg.serve.refresh_s}


def _gpus_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: ServeArgs | dict[str, Any]):
    """The Serve application for ``args`` (``serve.run(build_app(...))``)."""
    from ray import serve

    from pipelines.serve.deployments import IndexSearcher, QueryFeaturizer

    if isinstance(args, dict):
        args = ServeArgs(**args)
    cfg = ProjectConfig.load(args.config)
    scfg = cfg.serve
    swap = user_config(cfg, args)
    gpu = _gpus_available()
    featurizer_opts = {"num_cpus": scfg.cpus_per_replica, "num_gpus": 1 if gpu else 0}
    featurizer = QueryFeaturizer.options(
        num_replicas=scfg.featurizer_replicas, ray_actor_options=featurizer_opts, user_config=swap,
    ).bind(args.config, args.model, scfg.threads)
    searchers = [
        IndexSearcher.options(
            name=f"IndexSearcher{part}", num_replicas=scfg.searcher_replicas, user_config=swap,
            ray_actor_options={"num_cpus": scfg.cpus_per_replica},
        ).bind(part, scfg.partitions, scfg.searcher_threads)
        for part in range(scfg.partitions)
    ]
    serve_settings = to_mapping(scfg)
    ingress = serve.deployment(make_ingress(), name="AttributionAPI", max_ongoing_requests=256)
    return ingress.options(ray_actor_options={"num_cpus": 0}).bind(featurizer, searchers, serve_settings)


def make_ingress() -> type:
    """The FastAPI ingress class, made fresh per application (Serve wraps the app it is given)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    from attribution_core.config import ServeConfig, from_mapping
    from pipelines.serve.protocol import UNIFORM, RequestError, build_query, decode_base64, merge_partitions, plan_queries

    app = FastAPI(title="Training-data attribution for diffusion models",
                  description="Which training images did a generated image draw on: overall (general) and for "
                              "its subject, style and background, from learned per-parameter-group weights.",
                  version="1")

    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "detail": detail}}, status_code=status, headers=headers)

    @serve.ingress(app)
    class AttributionAPI:
        def __init__(self, featurizer, searchers: list, serve_settings: dict[str, Any]) -> None:
            self.featurizer = featurizer
            self.searchers = searchers
            self.cfg: ServeConfig = from_mapping(ServeConfig, serve_settings)
            self.api_key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
            if self.cfg.api_key_env and not self.api_key:
                raise RuntimeError(f"serve.api_key_env names {self.cfg.api_key_env}, which is not set in the "
                                   "endpoint's environment; set it (e.g. from a Secret) or remove serve.api_key_env")

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
            infos = await asyncio.gather(*(s.info.remote() for s in self.searchers))
            first = infos[0]
            return {"uri": first["uri"], "version": first["version"], "rows": first["rows"],
                    "groups": first["groups"], "aspects": first["aspects"], "weights": first["weights"],
                    "kernel": first["kernel"], "search_kernel": first["search_kernel"],
                    "model_fingerprint": first["model_fingerprint"], "created_at": first["created_at"],
                    "partitions": [{"part": i["part"], "rows": i["partition_rows"], "version": i["version"]}
                                   for i in infos]}

        @app.post("/v1/attributions", response_model=AttributionResponse,
                  summary="Attribute a generated image to training examples",
                  responses={400: {"description": "not an image / undecodable"}, 401: {"description": "API key"},
                             409: {"description": "no learned weights for an aspect"},
                             413: {"description": "image too large"}, 422: {"description": "bad aspect or k"},
                             503: {"description": "index or model being swapped; retry"}},
                  openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": AttributionRequest.model_json_schema()},
                      "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                          "image": {"type": "string", "format": "binary"}, "prompt": {"type": "string"},
                          "label": {"type": "string"}, "aspects": {"type": "string", "description": "comma-separated"},
                          "k": {"type": "integer"}}}}}}})
        async def attributions(self, request: Request):
            started = time.perf_counter()
            if not self._authorized(request):
                return error(401, f"send the API key in the {API_KEY_HEADER} header")
            try:
                query, defaulted = await self._read(request)
            except RequestError as exc:
                return error(exc.status, exc.detail)
            try:
                return await self._answer(query, defaulted, started)
            except RequestError as exc:
                headers = {"Retry-After": "1"} if exc.status == 503 else None
                return error(exc.status, exc.detail, headers)

        async def _read(self, request: Request):
            limit = self.cfg.max_image_bytes * 4 // 3 + 65536  # base64 or multipart overhead
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                raise RequestError(413, f"the request is {int(length):,} bytes; images are limited to "
                                        f"{self.cfg.max_image_bytes:,} bytes (serve.max_image_bytes)")
            kind = request.headers.get("content-type", "")
            if kind.startswith("multipart/form-data"):
                form = await request.form()
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise RequestError(400, "multipart requests need the image as a file field named 'image'")
                data = await upload.read()
                aspects = form.getlist("aspects") or None
                fields = {"prompt": form.get("prompt"), "label": form.get("label"), "k": form.get("k")}
            else:
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(400, f"the body is not JSON ({exc}); send JSON with a base64 'image' or "
                                            "multipart/form-data with an 'image' file") from exc
                if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                    raise RequestError(400, "the JSON body needs 'image': the PNG/JPEG bytes base64-encoded")
                data = decode_base64(body["image"])
                aspects = body.get("aspects")
                if aspects is not None and not isinstance(aspects, (list, str)):
                    raise RequestError(422, f"aspects must be a list of names, got {aspects!r}")
                fields = {"prompt": body.get("prompt"), "label": body.get("label"), "k": body.get("k")}
            query = build_query(data, fields["prompt"], fields["label"], aspects, fields["k"], self.cfg)
            return query, not aspects

        async def _featurize(self, item: dict[str, Any]) -> dict[str, Any]:
            try:
                feat = await self.featurizer.featurize.remote(item)
            except Exception as exc:
                log.exception("featurizer call failed")
                raise RequestError(503, f"the featurizer is unavailable ({type(exc).__name__}); retry") from exc
            if "error" in feat:
                raise RequestError(feat["error"]["status"], feat["error"]["detail"])
            return feat

        async def _answer(self, query, defaulted: bool, started: float) -> dict[str, Any]:
            plain, contrast = plan_queries(query.aspects, query.prompt, self.cfg.aspect_query)
            request = {"image": query.image, "prompt": query.prompt, "label": query.label}
            asks = ([request] if plain else []) + [{**request, "contrast_aspect": a} for a in contrast]
            feats = await asyncio.gather(*(self._featurize(r) for r in asks))
            searches = ([(feats[0], plain, plain)] if plain else []) + [
                (f, (weighting,), (a,)) for f, (a, weighting) in zip(feats[len(feats) - len(contrast):], contrast.items())]
            merged: dict[str, Any] = {}
            resolved: dict[str, str] = {}
            search_ms, answers = 0.0, []
            for feat, weightings, names in searches:
                item = {"features": feat["features"], "spec": feat["spec"], "aspects": list(weightings), "k": query.k,
                        "fallback": defaulted, "key": None}
                answers = await self._search(item)
                for name, part in zip(names, merge_partitions(answers, weightings, query.k).values()):
                    merged[name] = part
                if names == weightings:
                    resolved.update(answers[0]["resolved"])
                search_ms += max(a["search_ms"] for a in answers)
            return {
                "index": {"version": answers[0]["version"], "state": answers[0]["key"]},
                "query": {"id": feats[0]["query_id"], "prompt": query.prompt, "label": query.label},
                "k": query.k, "aspects": {a: merged[a] for a in query.aspects},
                "substituted": {a: used for a, used in resolved.items() if used != a},
                "aspect_queries": {a: "contrastive" if w == UNIFORM else "contrastive+aspect" for a, w in contrast.items()},
                "timing_ms": {"featurize": round(max(f["featurize_ms"] for f in feats), 2), "search": round(search_ms, 2),
                              "total": round((time.perf_counter() - started) * 1000, 2),
                              "featurize_batch": feats[0]["batch"]},
            }

        async def _search(self, item: dict[str, Any]) -> list[dict[str, Any]]:
            """Ask every partition; if they answered from different states (a swap is in
            progress), ask again pinned to the newest state all of them hold."""
            for _ in range(3):
                try:
                    answers = await asyncio.gather(*(s.search.remote(item) for s in self.searchers))
                except Exception as exc:
                    log.exception("searcher call failed")
                    raise RequestError(503, f"an index searcher is unavailable ({type(exc).__name__}); retry") from exc
                errors = [a["error"] for a in answers if "error" in a]
                if errors and any(e["status"] != 503 for e in errors):
                    e = next(e for e in errors if e["status"] != 503)
                    raise RequestError(e["status"], e["detail"])
                keys = {a.get("key") for a in answers}
                if not errors and len(keys) == 1:
                    return answers
                common = set.intersection(*(set(a["held"]) for a in answers))
                if not common:
                    break
                item = {**item, "key": max(common)}  # keys start with the version: v<seq>-...
            detail = errors[0]["detail"] if errors else "the index is being swapped to a new version"
            raise RequestError(503, f"{detail}; retry")

    return AttributionAPI
