"""Arrow schemas of the index: feature shards, the errors table, and source rows.

A feature shard holds one row per example: ``example_id``, ``content_hash``, source ``uri``,
``caption`` (null for models without text), ``metadata`` (only when ``index.keep_columns``
is set: the kept columns as a JSON object) and one ``fixed_size_list<float16>[k_g]`` column
per parameter group named ``g.<group>``, so reading one group decodes only that group.
Under a row-scaled measurement (DAS) a float32 ``row_scale`` column holds each example's
score scale: its score is ``s(x) * q'^T g(x)``. The group columns stay unscaled (the kernel is
built from them); ``flat_matrix`` applies the scale for scoring.
Plain pyarrow, pandas and DuckDB read these files.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from attribution_core.features.groups import GroupLayout

SCHEMA_VERSION = 1
KEY_COLUMNS = ("example_id", "content_hash", "uri", "caption")
METADATA = "metadata"  # kept dataset columns as a JSON object; only in shards of an index that keeps columns
GROUP_PREFIX = "g."
ROW_SCALE = "row_scale"
ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}

#: Normalized source rows, as the index job reads any dataset layout.
SOURCE_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("content_hash", pa.string()),
    ("uri", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("label", pa.string()),
    ("metadata", pa.string()),
])

ERRORS_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("content_hash", pa.string()),
    ("uri", pa.string()),
    ("reason", pa.string()),
])


def group_column(group: str) -> str:
    return f"{GROUP_PREFIX}{group}"


def feature_schema(layout: GroupLayout, dtype: str, row_scaled: bool = False, metadata: bool = False) -> pa.Schema:
    value = ARROW_DTYPES[dtype]
    fields = [pa.field(name, pa.string()) for name in (*KEY_COLUMNS, *([METADATA] if metadata else []))]
    fields += [pa.field(group_column(g.name), pa.list_(value, g.dim)) for g in layout.groups]
    if row_scaled:
        fields.append(pa.field(ROW_SCALE, pa.float32()))
    return pa.schema(fields)


def features_table(keys: pa.Table, flat: torch.Tensor, layout: GroupLayout, dtype: str,
                   *, scale: torch.Tensor | None = None) -> pa.Table:
    """Key columns of ``keys`` (one row per example) + ``flat`` ``Tensor[B, k_total]`` split
    into one fixed-size-list column per group, cast to ``dtype`` (+ ``row_scale`` from
    ``scale`` ``Tensor[B]``, when given)."""
    values = flat.detach().cpu().numpy().astype(NUMPY_DTYPES[dtype], copy=False)
    kept = METADATA in keys.column_names and keys.column(METADATA).null_count < keys.num_rows
    columns = [keys.column(name).cast(pa.string()) for name in (*KEY_COLUMNS, *([METADATA] if kept else []))]
    for g in layout.groups:
        block = np.ascontiguousarray(values[:, g.offset : g.offset + g.dim]).reshape(-1)  # [B, k_g] -> [B*k_g]
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(block, type=ARROW_DTYPES[dtype]), g.dim))
    if scale is not None:
        columns.append(pa.array(scale.detach().cpu().numpy().astype(np.float32), type=pa.float32()))
    return pa.Table.from_arrays(columns, schema=feature_schema(layout, dtype, scale is not None, kept))


def group_matrix(table: pa.Table, group: str) -> np.ndarray:
    """``[rows, k_g]`` numpy array (stored dtype) of one group's column."""
    column = table.column(group_column(group)).combine_chunks()
    width = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), width)


def row_scale(table: pa.Table) -> np.ndarray | None:
    """``[rows]`` float32 score scales of a row-scaled index's shard (None for the others)."""
    if ROW_SCALE not in table.column_names:
        return None
    return table.column(ROW_SCALE).to_numpy(zero_copy_only=False).astype(np.float32)


def flat_matrix(table: pa.Table, layout: GroupLayout, dtype: np.dtype = np.float32, scaled: bool = True) -> np.ndarray:
    """``[rows, k_total]`` array in the layout's order: the rows scores are taken against
    (each multiplied by its ``row_scale`` if the shard has one), or the stored features
    themselves with ``scaled=False`` (what the kernel is built from)."""
    out = np.empty((table.num_rows, layout.k_total), dtype=dtype)
    for g in layout.groups:
        out[:, g.offset : g.offset + g.dim] = group_matrix(table, g.name)
    scale = row_scale(table) if scaled else None
    if scale is not None:
        out *= scale[:, None].astype(dtype)
    return out


def errors_table(rows: list[dict[str, str | None]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
