"""Exemplar sets of the customization check: small groups of images that share one thing.

A set's ``kind`` says which answer it tests: ``subject``, ``style`` or ``background`` (that
aspect's answer) or ``general``. Sets come from the user's data (rows sharing one value of a
column: a subject, a style, a class, an ``artist``) or from folders the user provides
(``<root>/<set>/<image>``). Every refusal names the setting to change.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from attribution_core.config_evaluate import EXEMPLAR_KINDS as KINDS
from attribution_core.errors import ConfigError, InputError
from attribution_core.seeding import stable_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclasses.dataclass(frozen=True)
class ExemplarSet:
    """One set: its name and kind, and either dataset rows (``rows``, with the ``column`` and
    ``value`` they share) or image files (``paths``)."""

    name: str
    kind: str
    rows: tuple[int, ...] = ()
    paths: tuple[str, ...] = ()
    column: str | None = None
    value: str | None = None

    def __len__(self) -> int:
        return len(self.rows) or len(self.paths)


def _check_kind(kind: str, setting: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"{setting}: unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def draw_sets(attributes: Mapping[str, Sequence[object]], columns: Mapping[str, str], *, per_kind: int, size: int,
              seed: int, exclude: Collection[int] = ()) -> list[ExemplarSet]:
    """``per_kind`` sets of ``size`` rows for every ``kind: column`` of ``columns``: each set
    the rows of one value of the column (values drawn with ``seed`` among those with at least
    ``size`` rows outside ``exclude``; the rows drawn likewise)."""
    if per_kind < 1 or size < 1:
        raise ConfigError(f"evaluate.exemplars: sets per kind and size must be >= 1, got {per_kind} and {size}")
    out: list[ExemplarSet] = []
    for kind, column in columns.items():
        _check_kind(kind, "evaluate.exemplars.columns")
        if column not in attributes:
            raise ConfigError(f"evaluate.exemplars.columns.{kind}: the data has no column {column!r} "
                              f"(columns: {', '.join(sorted(attributes)) or 'none'})")
        by_value: dict[str, list[int]] = {}
        for row, value in enumerate(attributes[column]):
            if row not in exclude and value is not None and str(value) != "":
                by_value.setdefault(str(value), []).append(row)
        big = sorted(v for v, rows in by_value.items() if len(rows) >= size)
        if len(big) < per_kind:
            largest = max((len(r) for r in by_value.values()), default=0)
            raise ConfigError(f"evaluate.exemplars.size: {per_kind} {kind} set(s) of {size} images need as many values "
                              f"of column {column!r} with {size}+ rows; {len(big)} have that many (the largest has "
                              f"{largest}): lower size or per_kind")
        rng = random.Random(stable_seed("exemplar-sets", seed, kind, column))
        for value in rng.sample(big, per_kind):
            rows = tuple(sorted(rng.sample(by_value[value], size)))
            out.append(ExemplarSet(name=f"{kind}-{value}", kind=kind, rows=rows, column=column, value=value))
    return out


def folder_sets(root: str | Path, kinds: Mapping[str, str] | None = None) -> list[ExemplarSet]:
    """The sets under ``root``: each subfolder a set of the images in it, its kind from
    ``kinds`` (``{set: kind}``; 'general' for a set not named there)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"evaluate.exemplars.folder: {root} is not a folder (expected {root}/<set>/<image>)")
    kinds = dict(kinds or {})
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"evaluate.exemplars.folder: {root} has no set folders (expected {root}/<set>/<image>)")
    unknown = sorted(set(kinds) - {p.name for p in folders})
    if unknown:
        raise ConfigError(f"evaluate.exemplars.kinds names sets with no folder under {root}: {', '.join(unknown)}")
    out = []
    for folder in folders:
        kind = kinds.get(folder.name, "general")
        _check_kind(kind, f"evaluate.exemplars.kinds.{folder.name}")
        images = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"evaluate.exemplars.folder: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             "add images or remove the folder")
        out.append(ExemplarSet(name=folder.name, kind=kind, paths=tuple(images)))
    return out
