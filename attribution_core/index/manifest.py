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
from typing import Any

from attribution_core.config import FeaturizeConfig, to_mapping
from attribution_core.errors import ManifestMismatchError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.schema import SCHEMA_VERSION, group_column

KIND = "attribution-index"

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

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FeatureSpec:
        return cls(manifest["model"]["fingerprint"], manifest["featurize"], manifest["layout"], manifest["dtype"])

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


def build_manifest(version: str, sequence: int, supersedes: str | None, model: dict[str, Any], spec: FeatureSpec,
                   layout: GroupLayout, dataset: dict[str, Any], shards: list[dict[str, Any]],
                   errors: dict[str, list[str]], stats: dict[str, Any], build: dict[str, Any],
                   approximate: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an index version: what it was built from (``model``: path, fingerprint,
    class, conditioning, image shape; ``dataset``: source and keys digest), its feature spec,
    its shards (path, rows, bytes), its quarantined examples (``errors``: shard path -> ids),
    the kernel's statistics, how the build ran (``build``) and its approximate search index
    (``approximate``: ``attribution_core.index.approximate_files``; None without one)."""
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "version": version, "sequence": sequence,
        "supersedes": supersedes,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "featurize": spec.featurize, "layout": spec.layout, "dtype": spec.dtype,
        "columns": {g.name: group_column(g.name) for g in layout.groups},
        "dataset": dataset, "rows": sum(s["rows"] for s in shards), "shards": shards,
        "errors": {"rows": sum(len(ids) for ids in errors.values()), "shards": sorted(errors)},
        "stats": stats, "build": build, "approximate": approximate,
    }
