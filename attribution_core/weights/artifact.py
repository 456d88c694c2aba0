"""The weights artifact: learned per-group weights tied to the index version they came from.

Written as ``<index>/versions/<version>/weights/<name>.json``. Scoring refuses it against
any other index version or feature spec: weights learned on one set of features mean
nothing on another.
"""

from __future__ import annotations

from typing import Any

import torch

from attribution_core.errors import ManifestMismatchError
from attribution_core.index.manifest import FeatureSpec

KIND = "attribution-weights"
SCHEMA_VERSION = 1
UNIFORM = "uniform"


def artifact_path(version: str, name: str) -> str:
    return f"versions/{version}/weights/{name}.json"


def weights_document(index_uri: str, manifest: dict[str, Any], aspects: dict[str, dict[str, Any]],
                     settings: dict[str, Any]) -> dict[str, Any]:
    groups = [g["name"] for g in manifest["layout"]["groups"]]
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "index": {"uri": index_uri, "version": manifest["version"],
                  "feature_spec": FeatureSpec.from_manifest(manifest).key(),
                  "model_fingerprint": manifest["model"]["fingerprint"]},
        "groups": groups, "aspects": aspects, **settings,
    }


def check_weights(document: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Raise ``ManifestMismatchError`` unless ``document`` was learned on this index version."""
    if document.get("kind") != KIND:
        raise ManifestMismatchError(f"not a weights artifact (kind {document.get('kind')!r})")
    learned = document["index"]
    spec = FeatureSpec.from_manifest(manifest).key()
    if learned["version"] != manifest["version"] or learned["feature_spec"] != spec:
        raise ManifestMismatchError(
            f"these weights were learned on index version {learned['version']} (feature spec "
            f"{learned['feature_spec']}), not on {manifest['version']} (feature spec {spec}); "
            "learn weights for this version with `attribution learn-weights`")
    groups = [g["name"] for g in manifest["layout"]["groups"]]
    if document["groups"] != groups:
        raise ManifestMismatchError(f"weights cover groups {document['groups']}, the index has {groups}")


def weights_matrix(document: dict[str, Any], aspects: list[str]) -> torch.Tensor:
    """``Tensor[A, M]`` weights of ``aspects`` (``'uniform'`` = 1/M for every group)."""
    m = len(document["groups"])
    rows = []
    for aspect in aspects:
        if aspect == UNIFORM:
            rows.append(torch.full((m,), 1.0 / m))
        elif aspect in document["aspects"]:
            rows.append(torch.tensor(document["aspects"][aspect]["weights"], dtype=torch.float32))
        else:
            raise ManifestMismatchError(f"no weights for aspect {aspect!r}; learned: "
                                        f"{', '.join(document['aspects'])} (and {UNIFORM})")
    return torch.stack(rows)
