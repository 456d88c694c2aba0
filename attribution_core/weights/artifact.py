"""The weights artifact: learned per-group weights tied to the index version they came from.

Written as ``<index>/versions/<version>/weights/<name>.json``. Scoring refuses it against
any other index version or feature spec: weights learned on one set of features mean
nothing on another.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch

from attribution_core.answers import UNIFORM
from attribution_core.errors import ManifestMismatchError
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.store import IndexStore

KIND = "attribution-weights"
SCHEMA_VERSION = 1
READABLE_SCHEMAS = (SCHEMA_VERSION,)  # artifacts of these schemas load; a new schema adds its reader here


class IndexRef(TypedDict):
    """The index version weights were learned on, and what its features were."""

    uri: str
    version: str
    feature_spec: str  # ``FeatureSpec.key()``
    model_fingerprint: str


class Choice(TypedDict, total=False):
    """Which weighting answers an aspect, and the evidence (``weights.choice.record``): under
    ``validation`` also the queries, ``k``, each weighting's Recall and its interval; under
    ``lds`` the basis, the served LDS, the checkpoints and the index it was measured on."""

    answered_by: str  # the aspect's own weights, 'general', or 'uniform'
    by: str  # validation, lds, unvalidated
    rule: str
    gains: dict[str, list[float]]  # weighting -> paired gain over uniform [mean, low, high]
    queries: int
    k: int
    recall: dict[str, float]
    intervals: dict[str, list[float]]
    basis: str
    lds: dict[str, Any]
    checkpoints: int
    measured_on: dict[str, Any]


class ServedAnswer(TypedDict):
    """An aspect's answer as the artifact records it: the weighting and its evidence."""

    answered_by: str
    choice: Choice


class AspectWeights(TypedDict, total=False):
    """One aspect of the artifact: the weights served (after shrinkage toward uniform), the
    learned ones, and how they were chosen and checked."""

    weights: list[float]  # one per group, in ``groups`` order
    learned: list[float]
    shrinkage: dict[str, Any] | None  # the held-out move from uniform (``weights.shrinkage``)
    theta: list[float]
    queries: int
    prompts: list[str]
    pool_recall: dict[str, float]
    shown: float | None
    answered_by: str
    choice: Choice
    validation: Choice | None


class WeightsDocument(TypedDict, total=False):
    """``versions/<version>/weights/<name>.json``. Besides these, the learning run's settings
    and measurements: ``k``, ``lambda_w``, ``kernel``, ``rounds``, ``recall_by_round``,
    ``pool_size``, ``query_seed``, ``trajectory``, ``settings``, ``created_at``, ``seconds``,
    ``stage_seconds``."""

    kind: str
    schema_version: int
    index: IndexRef
    groups: list[str]
    aspects: dict[str, AspectWeights]


def unvalidated_choice(aspect: str) -> str:
    """What answers an aspect of an artifact without evidence for another weighting (see
    ``weights.choice``): its own weights; uniform ones for 'general'."""
    return UNIFORM if aspect == "general" else aspect


def artifact_path(version: str, name: str) -> str:
    return f"versions/{version}/weights/{name}.json"


def weights_document(index_uri: str, manifest: IndexManifest, aspects: dict[str, AspectWeights],
                     settings: dict[str, Any]) -> WeightsDocument:
    groups = [g["name"] for g in manifest.layout["groups"]]
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "index": {"uri": index_uri, "version": manifest.version, "feature_spec": manifest.spec.key(),
                  "model_fingerprint": manifest.model.fingerprint},
        "groups": groups, "aspects": aspects, **settings,
    }


def check_schema(document: WeightsDocument) -> None:
    """Refuse a document that is not a weights artifact of a schema this code reads."""
    if document.get("kind") != KIND:
        raise ManifestMismatchError(f"not a weights artifact (kind {document.get('kind')!r})")
    if document.get("schema_version") not in READABLE_SCHEMAS:
        raise ManifestMismatchError(
            f"a weights artifact of schema {document.get('schema_version')}; this version of attribution reads "
            f"{KIND} schema {', '.join(map(str, READABLE_SCHEMAS))}: learn the weights again with "
            "`attribution learn-weights`")


def check_weights(document: WeightsDocument, manifest: IndexManifest, same_version: bool = True) -> None:
    """Raise ``ManifestMismatchError`` unless ``document`` fits this index version.

    ``same_version``: learned on exactly this version. Otherwise a version with the same
    feature spec and groups is enough (weights of an earlier version serving an index that
    grew incrementally, until they are re-learned).
    """
    check_schema(document)
    learned = document["index"]
    spec = manifest.spec.key()
    if learned["feature_spec"] != spec or (same_version and learned["version"] != manifest.version):
        raise ManifestMismatchError(
            f"these weights were learned on index version {learned['version']} (feature spec "
            f"{learned['feature_spec']}), not on {manifest.version} (feature spec {spec}); "
            "learn weights for this version with `attribution learn-weights`")
    groups = [g["name"] for g in manifest.layout["groups"]]
    if document["groups"] != groups:
        raise ManifestMismatchError(f"weights cover groups {document['groups']}, the index has {groups}")


def find_weights(store: IndexStore, manifest: IndexManifest, name: str) -> WeightsDocument | None:
    """The weights ``name`` of this version, else of the nearest earlier version it
    supersedes with the same feature spec; None when there are none."""
    version: str | None = manifest.version
    seen = set()
    while version and version not in seen:
        seen.add(version)
        document = store.read_json(artifact_path(version, name))
        if document is not None:
            check_schema(document)  # an artifact this code cannot read is an error, never "no weights"
            try:
                check_weights(document, manifest, same_version=False)
            except ManifestMismatchError:
                return None  # an earlier feature spec: older weights cannot fit either
            return document
        older = store.manifest(version) if version != manifest.version else manifest
        version = older.supersedes if older else None
    return None


def weights_matrix(document: WeightsDocument, aspects: list[str]) -> torch.Tensor:
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
