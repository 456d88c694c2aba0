"""What makes two sets of features comparable, and the checks that refuse to mix them.

A ``FeatureSpec`` is the part of an index manifest that decides feature values: the model
fingerprint, the featurize settings (measurement, timesteps, noise draws, projection, groups,
seed, precision), the group layout and the stored dtype. An incremental reindex may reuse a
previous version's rows only when the specs are equal; a query may be scored against an
index only under the same spec.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any, TypedDict

from attribution_core.config import FeaturizeConfig, to_mapping
from attribution_core.errors import ManifestMismatchError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.schema import SCHEMA_VERSION, group_column

KIND = "attribution-index"
READABLE_SCHEMAS = (SCHEMA_VERSION,)  # manifests of these schemas load; a new schema adds its reader here

# Settings that change how features are computed but not their values.
_NOT_IN_SPEC = ("max_rows_per_pass",)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    model_fingerprint: str
    featurize: dict[str, Any]
    layout: dict[str, Any]
    dtype: str

    @classmethod
    def build(cls, fingerprint: str, cfg: FeaturizeConfig, layout: GroupLayout, dtype: str) -> FeatureSpec:
        featurize = {k: v for k, v in to_mapping(cfg).items() if k not in _NOT_IN_SPEC}
        return cls(fingerprint, json.loads(json.dumps(featurize)), layout.to_manifest(), dtype)

    def key(self) -> str:
        """Hex hash identifying the spec."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def differences(self, other: FeatureSpec) -> list[str]:
        """Human-readable list of what differs (empty when the specs are equal)."""
        out = []
        if self.model_fingerprint != other.model_fingerprint:
            out.append(f"model fingerprint {other.model_fingerprint} != {self.model_fingerprint} (a different model)")
        for key in sorted(set(self.featurize) | set(other.featurize)):
            a, b = other.featurize.get(key), self.featurize.get(key)
            if a != b:
                out.append(f"featurize.{key}: {json.dumps(a)} != {json.dumps(b)}")
        if self.featurize == other.featurize and self.layout != other.layout:
            out.append("group layout (tracked layers or group offsets) differs")
        if self.dtype != other.dtype:
            out.append(f"index.dtype: {other.dtype} != {self.dtype}")
        return out


def check_same_features(expected: FeatureSpec, found: FeatureSpec, what: str, fix: str) -> None:
    """Raise ``ManifestMismatchError`` naming every difference between ``found`` and ``expected``."""
    diffs = expected.differences(found)
    if diffs:
        raise ManifestMismatchError(f"{what} was built differently (found != expected): " + "; ".join(diffs) + f". {fix}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The model a version was built with: where it was (``path``; ``base``: the base pipeline
    of a LoRA without ``lora.json``), its ``fingerprint`` (``models.fingerprint``), the
    denoiser's class, its conditioning and its image shape ``[C, H, W]``."""

    fingerprint: str
    path: str | None = None
    class_name: str | None = None
    conditioning: str | None = None
    image_shape: tuple[int, ...] = ()
    base: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, **({"base": self.base} if self.base else {}), "fingerprint": self.fingerprint,
                "class": self.class_name, "conditioning": self.conditioning, "image_shape": list(self.image_shape)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelRecord:
        return cls(fingerprint=doc["fingerprint"], path=doc.get("path"), class_name=doc.get("class"),
                   conditioning=doc.get("conditioning"), image_shape=tuple(doc.get("image_shape") or ()),
                   base=doc.get("base"))


@dataclasses.dataclass(frozen=True)
class Shard:
    """One feature shard of a version: its path under the index root, rows and bytes."""

    path: str
    rows: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Quarantine:
    """The examples a version could not featurize: how many, and the error shards that name
    them with their reasons (``index.schema.ERRORS_SCHEMA``)."""

    rows: int = 0
    shards: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """How a version was built (the manifest's ``build``; ``attribution index`` prints it):
    its mode and base version, what the plan did with each example, the actors and their
    throughput, rows per Ray node, each stage's seconds, and (a listed Parquet dataset) what
    was read of the source files (``source_*``)."""

    mode: str
    base: str | None = None
    new: int = 0
    changed: int = 0
    removed: int = 0
    reused: int = 0
    resumed: int = 0
    featurized: int = 0
    quarantined: int = 0
    stale_temporaries_removed: int = 0
    actors: int = 0
    threads_per_actor: int = 0
    device: str = "cpu"
    batch_size: int = 0
    actor_busy_seconds: float = 0.0
    steady_rows_per_s: float | None = None
    rows_by_node: dict[str, int] = dataclasses.field(default_factory=dict)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    source: dict[str, int] = dataclasses.field(default_factory=dict)
    """``source_files``, ``source_files_unchanged``, ``source_files_hashed``,
    ``source_files_featurized``, ``source_bytes_read``, ``source_bytes`` (empty for datasets
    that are not listed files)."""

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        return {**{k: v for k, v in doc.items() if k != "source"}, **self.source}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BuildRecord:
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        return cls(**{k: v for k, v in doc.items() if k in names},
                   source={k: v for k, v in doc.items() if k.startswith("source_")})


KernelBlock = TypedDict("KernelBlock", {  # ``lambda`` is a keyword: the functional form
    "name": str, "offset": int, "dim": int, "lambda": float, "gram": str, "kernel": str})
"""One block of the kernel: its columns (``offset``, ``dim``), the damping it was inverted
with (``lambda``), and where its Gram and kernel arrays are (relative to the index root)."""


class KernelChoice(TypedDict, total=False):
    """How the kernel was chosen: 'fixed' (the settings), or by the objective on generated
    queries (``objective``: kernel -> damping -> value, on ``queries`` queries at ``top_k``)."""

    rule: str
    kernel: str
    damping: float
    objective: dict[str, dict[str, float]]
    queries: int
    top_k: int


class _KernelStats(TypedDict):
    kernel: str
    damping: float
    dtype: str
    blocks: list[KernelBlock]


class KernelStats(_KernelStats, total=False):
    """A version's ``stats``: the kernel's structure and damping, and its blocks."""

    kernel_choice: KernelChoice


@dataclasses.dataclass(frozen=True)
class IndexManifest:
    """The manifest of an index version (``versions/<version>/manifest.json``, written last:
    the commit marker). What it was built from (``model``; ``dataset``: source, keys digest,
    listing), its feature spec (``featurize``, ``layout``, ``dtype``), its shards and
    quarantined examples, the kernel's statistics (``stats``), how the build ran (``build``)
    and its approximate search index (``approximate``: ``index.approximate_files``; None
    without one). ``from_json`` refuses a document of another kind or of a schema this code
    does not read."""

    version: str
    sequence: int
    model: ModelRecord
    featurize: dict[str, Any]
    layout: dict[str, Any]
    dtype: str
    dataset: dict[str, Any]
    shards: tuple[Shard, ...]
    errors: Quarantine = Quarantine()
    stats: KernelStats = dataclasses.field(default_factory=dict)
    build: BuildRecord | None = None
    approximate: dict[str, Any] | None = None
    supersedes: str | None = None
    created_at: str = dataclasses.field(default_factory=_now)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def shard_paths(self) -> list[str]:
        return [s.path for s in self.shards]

    @property
    def columns(self) -> dict[str, str]:
        """Group name -> its column in the feature shards."""
        return {g["name"]: group_column(g["name"]) for g in self.layout["groups"]}

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.model.fingerprint, self.featurize, self.layout, self.dtype)

    @property
    def group_layout(self) -> GroupLayout:
        return GroupLayout.from_manifest(self.layout)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND, "schema_version": SCHEMA_VERSION, "version": self.version, "sequence": self.sequence,
            "supersedes": self.supersedes, "created_at": self.created_at, "model": self.model.to_json(),
            "featurize": self.featurize, "layout": self.layout, "dtype": self.dtype,
            "columns": self.columns,
            "dataset": self.dataset, "rows": self.rows, "shards": [dataclasses.asdict(s) for s in self.shards],
            "errors": {"rows": self.errors.rows, "shards": list(self.errors.shards)},
            "stats": self.stats, "build": self.build.to_json() if self.build else None,
            "approximate": self.approximate,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str) -> IndexManifest:
        """The manifest ``doc`` read from ``where``; ``ManifestMismatchError`` for a document
        that is not an index manifest of a schema this code reads, or that lacks a field."""
        if doc.get("kind") != KIND or doc.get("schema_version") not in READABLE_SCHEMAS:
            raise ManifestMismatchError(
                f"{where} is a {doc.get('kind') or 'document without a kind'} of schema {doc.get('schema_version')}; "
                f"this version of attribution reads {KIND} schema {', '.join(map(str, READABLE_SCHEMAS))}: "
                "open it with the version that wrote it, or rebuild the index with `attribution index --mode full`")
        try:
            manifest = cls(
                version=doc["version"], sequence=doc["sequence"], model=ModelRecord.from_json(doc["model"]),
                featurize=doc["featurize"], layout=doc["layout"], dtype=doc["dtype"], dataset=doc["dataset"],
                shards=tuple(Shard(s["path"], s["rows"], s["bytes"]) for s in doc["shards"]),
                errors=Quarantine(doc["errors"]["rows"], tuple(doc["errors"]["shards"])), stats=doc["stats"],
                build=BuildRecord.from_json(doc["build"]) if doc.get("build") else None, approximate=doc.get("approximate"), supersedes=doc.get("supersedes"),
                created_at=doc.get("created_at") or "")
        except (KeyError, TypeError) as exc:
            raise ManifestMismatchError(f"{where} is not a complete {KIND} manifest (missing or malformed: {exc})") \
                from exc
        if manifest.rows != doc["rows"]:
            raise ManifestMismatchError(f"{where}: the manifest says {doc['rows']} rows, its shards list "
                                        f"{manifest.rows}")
        return manifest
