"""Opening an index version for use, the one way every reader of an index does it.

Weight learning, the endpoint and the evaluation all need the same three things before any
work starts: a committed version of a schema this code reads, with rows in it; the model it
was built with (checked by fingerprint); and a featurizer with that version's own featurize
settings, so query features match the stored rows by construction.
"""

from __future__ import annotations

from attribution_core.config import FeaturizeConfig, from_mapping
from attribution_core.errors import EmptyIndexError, ManifestMismatchError
from attribution_core.features.featurize import Featurizer
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.store import IndexStore
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.fingerprint import model_fingerprint


def open_version(store: IndexStore, version: str | None = None, need_rows: bool = True) -> IndexManifest:
    """The manifest of ``version`` (default: the one ``latest`` names), refused with a named
    error when it is missing, of another schema (``IndexManifest.from_json``), or
    (``need_rows``) empty."""
    manifest = store.manifest(version) if version else store.latest()
    if manifest is None:
        what = f"committed version {version!r}" if version else "committed version"
        raise ManifestMismatchError(f"{store.uri!r} holds no {what}; build one with `attribution index`")
    if need_rows and not manifest.rows:
        raise EmptyIndexError(
            f"index version {manifest.version} at {store.uri} has no rows ({manifest.errors.rows:,} examples "
            "quarantined: its errors/ table says why); fix the dataset or its settings and build the index again "
            "with `attribution index`")
    return manifest


def check_model(fingerprint: str, manifest: IndexManifest, model_path: str) -> None:
    """Refuse a model (by its ``model_fingerprint``) other than the one ``manifest``'s
    version was built with."""
    if fingerprint != manifest.model.fingerprint:
        raise ManifestMismatchError(
            f"the model at {model_path} is not the one index version {manifest.version} was built with "
            f"(fingerprints differ; the index was built from {manifest.model.path}); use that model "
            "(--model) or rebuild the index")


def open_for_model(store: IndexStore, version: str | None, adapter: DiffusersAdapter, model_path: str,
                   *, max_rows_per_pass: int, fingerprint: str | None = None,
                   cache: dict[str, Featurizer] | None = None) -> tuple[IndexManifest, Featurizer]:
    """Everything a reader that featurizes queries needs, in one call: the version's manifest
    (``open_version``), ``adapter`` checked to be the model it was built with (pass its
    ``fingerprint`` when already known), and a featurizer with the version's own settings.
    ``cache`` (feature spec key -> featurizer) keeps featurizers across calls, as a server
    that swaps versions does."""
    manifest = open_version(store, version)
    check_model(model_fingerprint(adapter) if fingerprint is None else fingerprint, manifest, model_path)
    if cache is None:
        return manifest, version_featurizer(adapter, manifest, max_rows_per_pass)
    key = manifest.spec.key()
    if key not in cache:
        cache[key] = version_featurizer(adapter, manifest, max_rows_per_pass)
    return manifest, cache[key]


def version_featurizer(adapter: DiffusersAdapter, manifest: IndexManifest, max_rows_per_pass: int) -> Featurizer:
    """A featurizer with the version's own featurize settings (``max_rows_per_pass`` changes
    memory, not values, so the caller's is kept)."""
    fcfg = from_mapping(FeaturizeConfig, {**manifest.featurize, "max_rows_per_pass": max_rows_per_pass})
    return Featurizer(adapter, fcfg)
