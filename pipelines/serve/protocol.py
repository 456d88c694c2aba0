"""What travels over HTTP, declared once here: the request (``AttributionRequest``: its
OpenAPI schema for JSON and multipart, and its checks), the response
(``AttributionResponse``, merged exactly from the partitions' answers) and ``GET
/v1/index`` (``IndexDescription``). What the deployments pass each other is in
``pipelines.serve.messages``. No Ray or FastAPI here, so all of it is testable in-process."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, TypedDict

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator

from attribution_core.answers import UNIFORM
from attribution_core.config_serve import QUERY_ASPECTS, ServeConfig
from attribution_core.config_stages import ASPECTS
from attribution_core.errors import RequestError
from pipelines.serve.messages import PartitionAnswer


def decode_base64(data: str) -> bytes:
    if "," in data[:100] and data.startswith("data:"):  # a data URL: data:image/png;base64,....
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"'image' is not valid base64 ({exc}); send the PNG/JPEG bytes base64-encoded "
                                "or upload them as multipart/form-data") from exc


def check_image(data: bytes, cfg: ServeConfig) -> None:
    """Size limits (413) and a header check (400) before anything decodes pixels."""
    if not data:
        raise RequestError(400, "the image is empty; send PNG or JPEG bytes")
    if len(data) > cfg.max_image_bytes:
        raise RequestError(413, f"the image is {len(data):,} bytes; the limit is {cfg.max_image_bytes:,} "
                                "(serve.max_image_bytes). Send a smaller or recompressed image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            kind = img.format
    except Image.DecompressionBombError as exc:  # a header declaring more pixels than PIL will decode
        raise RequestError(413, f"the image declares more pixels than may be decoded ({exc}); the limit is "
                                f"{cfg.max_image_pixels:,} (serve.max_image_pixels). Downscale it first") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(400, f"the upload is not an image PIL can read ({exc}); send PNG or JPEG bytes") from exc
    if width * height > cfg.max_image_pixels:
        raise RequestError(413, f"the image is {width}x{height} = {width * height:,} pixels; the limit is "
                                f"{cfg.max_image_pixels:,} (serve.max_image_pixels). Downscale it first")
    if kind not in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"):
        raise RequestError(400, f"the image is {kind}; send PNG or JPEG")


def parse_aspects(raw: list[str] | str | None, cfg: ServeConfig) -> tuple[str, ...]:
    if raw is None or raw == [] or raw == "":
        return tuple(cfg.default_aspects)
    items = raw.split(",") if isinstance(raw, str) else [a for part in raw for a in str(part).split(",")]
    aspects = tuple(dict.fromkeys(a.strip() for a in items if a.strip()))
    unknown = [a for a in aspects if a not in QUERY_ASPECTS]
    if unknown or not aspects:
        raise RequestError(422, f"unknown aspect(s) {_shown(unknown or raw)}; choose from {', '.join(QUERY_ASPECTS)}")
    return aspects


def parse_k(raw: Any, cfg: ServeConfig) -> int:
    if raw is None or raw == "":
        return cfg.default_k
    try:
        if isinstance(raw, bool):
            raise TypeError("a boolean")
        k = int(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RequestError(422, f"k must be an integer in [1, {cfg.max_k}], got {_shown(raw)}") from exc
    if isinstance(raw, float) and raw != k or not 1 <= k <= cfg.max_k:
        raise RequestError(422, f"k must be an integer in [1, {cfg.max_k}] (serve.max_k), got {_shown(raw)}")
    return k


def parse_prompt(raw: Any, cfg: ServeConfig) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise RequestError(422, f"prompt must be text, got {type(raw).__name__} {_shown(raw)}")
    if len(raw) > cfg.max_prompt_chars:
        raise RequestError(422, f"the prompt is {len(raw):,} characters; the limit is {cfg.max_prompt_chars:,} "
                                "(serve.max_prompt_chars)")
    return raw


def parse_label(raw: Any) -> str | int | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or isinstance(raw, str) and len(raw) > 200:
        raise RequestError(422, f"label must be a class name or index, got {_shown(raw)}")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _limits(info: ValidationInfo) -> ServeConfig:
    cfg = (info.context or {}).get("cfg")
    if not isinstance(cfg, ServeConfig):
        raise TypeError("AttributionRequest is validated with context={'cfg': <the endpoint's ServeConfig>}")
    return cfg


IMAGE_DOC = "PNG or JPEG bytes: base64-encoded in JSON (a data: URL is accepted), a file in multipart/form-data."


class AttributionRequest(BaseModel):
    """A query to ``POST /v1/attributions``, checked: the one declaration of the request.

    JSON carries the image base64-encoded; multipart/form-data the same fields with the image
    as a file (``multipart_schema``). Validation needs the endpoint's limits as context
    (``checked``); a refused value raises ``RequestError`` with the status and what to change,
    checked in field order (the image first)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    image: Annotated[bytes, WithJsonSchema({"type": "string", "contentEncoding": "base64", "description": IMAGE_DOC})]
    prompt: str | None = Field(None, description="The prompt the image was generated from (text-to-image models).")
    label: str | int | None = Field(None, description="Class name or index (class-conditional models).")
    aspects: Annotated[tuple[str, ...], WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]})] = Field(
        None, validate_default=True, description="Any of general, subject, style, background, uniform: a list, or "
                                                 "names separated by commas (none: serve.default_aspects).")
    k: Annotated[int, WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "null"}]})] = Field(
        None, validate_default=True, description="Training examples per aspect, at most serve.max_k "
                                                 "(none: serve.default_k).")

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, raw: Any, info: ValidationInfo) -> bytes:
        data = decode_base64(raw) if isinstance(raw, str) else raw
        if not isinstance(data, bytes):
            raise RequestError(400, "'image' must be the PNG/JPEG bytes: base64-encoded in JSON, a file in multipart")
        check_image(data, _limits(info))
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, raw: Any, info: ValidationInfo) -> str | None:
        return parse_prompt(raw, _limits(info))

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, raw: Any) -> str | int | None:
        return parse_label(raw)

    @field_validator("aspects", mode="before")
    @classmethod
    def _aspects(cls, raw: Any, info: ValidationInfo) -> tuple[str, ...]:
        if raw is not None and not isinstance(raw, (list, tuple, str)):
            raise RequestError(422, f"aspects must be a list of names, got {_shown(raw)}")
        return parse_aspects(raw, _limits(info))

    @field_validator("k", mode="before")
    @classmethod
    def _k(cls, raw: Any, info: ValidationInfo) -> int:
        return parse_k(raw, _limits(info))

    @classmethod
    def checked(cls, fields: dict[str, Any], cfg: ServeConfig) -> AttributionRequest:
        """The request these raw ``fields`` make under the endpoint's limits ``cfg``."""
        try:
            return cls.model_validate(fields, context={"cfg": cfg})
        except ValidationError as exc:  # a shape no check above foresaw: still the client's to fix
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "the body"
            raise RequestError(422, f"{where}: {first['msg']}") from exc


def multipart_schema() -> dict[str, Any]:
    """The OpenAPI schema of the multipart/form-data body: the request's own fields, the image a file."""
    schema = AttributionRequest.model_json_schema()
    schema["properties"]["image"] = {"type": "string", "format": "binary", "description": IMAGE_DOC}
    return schema


def build_query(image: bytes, prompt: str | None, label: Any, aspects: Any, *, k: Any,
                cfg: ServeConfig) -> AttributionRequest:
    return AttributionRequest.checked({"image": image, "prompt": prompt, "label": label, "aspects": aspects, "k": k},
                                      cfg)


def _shown(raw: Any) -> str:
    """A client's value as an error message quotes it: at most 80 characters of its repr."""
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def plan_queries(aspects: tuple[str, ...], prompt: str | None, mode: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which aspects the query's own feature answers, and for the others (``mode`` contrastive
    or both, with a prompt) ``{aspect: weighting}`` of its contrastive feature: uniform
    ('contrastive') or the aspect's own weights ('both')."""
    if mode == "weighted" or not prompt:
        return aspects, {}
    contrast = {a: UNIFORM if mode == "contrastive" else a for a in aspects if a in ASPECTS and a != "general"}
    return tuple(a for a in aspects if a not in contrast), contrast


def merge_partitions(answers: list[PartitionAnswer], aspects: tuple[str, ...], k: int) -> dict[str, list[Attribution]]:
    """Exact top-k per aspect over the partitions' own top-k lists (each partition's top-k
    holds every one of its rows that can be in the global top-k), with each result's share
    of the top-k score mass: ``max(score, 0) / sum of max(score, 0)`` over the k returned."""
    merged: dict[str, list[Attribution]] = {}
    for aspect in aspects:
        rows = [r for answer in answers for r in answer.results[aspect]]
        rows.sort(key=lambda r: (-r["score"], r["example_id"]))
        top = rows[:k]
        mass = sum(max(r["score"], 0.0) for r in top)
        merged[aspect] = [Attribution(rank=i + 1, example_id=r["example_id"], score=r["score"],
                                      share=(max(r["score"], 0.0) / mass) if mass > 0 else 0.0, uri=r["uri"],
                                      caption=r["caption"], metadata=r.get("metadata") or {})
                          for i, r in enumerate(top)]
    return merged


class Attribution(BaseModel):
    """One training example of an aspect's answer."""

    rank: int
    example_id: str
    score: float
    share: float = Field(description="max(score, 0) / the sum of max(score, 0) over the k returned: this "
                         "example's part of the positive score mass among these k, not a share of the whole "
                         "training set's influence.")
    uri: str
    caption: str
    metadata: dict[str, Any] = Field(default_factory=dict, description=(
        "The dataset columns the index keeps (index.keep_columns), e.g. artist, license, source_url."))


class AnsweredFrom(BaseModel):
    version: str = Field(description="The index version that answered.")
    state: str = Field(description="The searchers' state key: the version and its weights.")


class QueryEcho(BaseModel):
    id: str = Field(description="The query's content id.")
    prompt: str | None
    label: str | int | None
    features_cached: bool = Field(description="Every feature of this query came from the featurizer's cache.")


class Timing(BaseModel):
    featurize: float
    search: float
    total: float
    featurize_batch: int = Field(description="Queries featurized together with this one (0: from the cache).")


class AttributionResponse(BaseModel):
    """The answer to ``POST /v1/attributions``."""

    index: AnsweredFrom
    query: QueryEcho
    k: int
    aspects: dict[str, list[Attribution]]
    answered_by: dict[str, str] = Field(default_factory=dict, description=(
        "The weighting that answered each aspect searched with the query's own feature: the one measured best "
        "for this index version (see /v1/index answered_by for the evidence)."))
    substituted: dict[str, str] = Field(default_factory=dict, description=(
        "Aspects answered by another weighting than their own: the one measured best for this index version "
        "(uniform unless learned weights were measured better: evaluate's LDS, else validation queries; see "
        "/v1/index answered_by), or uniform where none are learned."))
    aspect_queries: dict[str, str] = Field(default_factory=dict, description=(
        "Aspects answered from Concept-TRAK's contrastive query feature (serve.aspect_query): 'contrastive' "
        "(uniform weights) or 'contrastive+aspect' (the aspect's weights)."))
    timing_ms: Timing


class PartitionDescription(TypedDict):
    part: int
    rows: int
    version: str
    search: str
    search_bytes_per_row: float


class IndexDescription(TypedDict):
    """``GET /v1/index``: the served version, its groups and weighted aspects, which weighting
    answers each aspect and why, the kernel and search, and every searcher partition."""

    uri: str
    version: str
    rows: int
    groups: list[str]
    aspects: list[str]
    weights: dict[str, Any] | None
    answered_by: dict[str, dict[str, Any]]
    kernel: str
    search: str
    search_kernel: str
    model_fingerprint: str
    created_at: str
    partitions: list[PartitionDescription]
