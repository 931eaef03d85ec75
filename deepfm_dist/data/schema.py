"""What the data looks like: the feature specs the model is built from, and the checks of each
file's schema (footer only) against the configuration.

Column kinds and the Parquet/Arrow types they accept (dictionary-encoded forms of each too):

========================  =============================================================
label                     integer, bool or floating; values must be 0 or 1, no nulls
dense                     integer or floating (nulls, NaN and +-inf become 0)
sparse                    integer or string (one id per row; null -> the reserved row 0)
sparse in ``multi_hot``   list / large_list of integer or string (a bag of ids per row;
                          a null or empty list is an empty bag, a null element is row 0)
weights of ``weighted``   floating or integer, list-typed iff its ids column is
pass-through              any type (carried beside a batch, never converted; see
                          ``ParquetLoader(passthrough=...)``)
========================  =============================================================

Every file must have the same types for the columns read (other columns may differ and are
never read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from deepfm_dist.config import DataConfig


@dataclass(frozen=True)
class FeatureSpec:
    """One sparse column as the model sees it.

    name: the column and KeyedJaggedTensor key.
    table: embedding table it looks up (its own name unless ``data.shared_tables`` says
        otherwise; several features may name one table).
    num_embeddings: rows of that table (from ``DataConfig.table_sizes()``; the config
        checks that features sharing a table agree).
    pooling: "sum" or "mean" over the feature's ids in a row (torchrec pools per table, so
        features sharing a table share it too).
    weighted: the KeyedJaggedTensor carries a weight per id (``data.weighted``).
    multi_hot: a list column (any number of ids per row) rather than one id per row.
    """

    name: str
    table: str
    num_embeddings: int
    pooling: str
    weighted: bool
    multi_hot: bool


def feature_specs(cfg: DataConfig) -> list[FeatureSpec]:
    """The sparse features in ``cfg.sparse`` order; needs no file (the model is built from it)."""
    sizes = cfg.table_sizes()
    return [
        FeatureSpec(
            name=col,
            table=cfg.shared_tables.get(col, col),
            num_embeddings=sizes[col],
            pooling=cfg.pooling.get(col, "sum"),
            weighted=col in cfg.weighted,
            multi_hot=col in cfg.multi_hot,
        )
        for col in cfg.sparse
    ]


# --------------------------------------------------------------------------- type checks


def value_type(t: pa.DataType) -> pa.DataType:
    """The type a column is read as: dictionary-encoded columns are decoded."""
    return t.value_type if pa.types.is_dictionary(t) else t


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _id(t: pa.DataType) -> bool:
    t = value_type(t)
    return pa.types.is_integer(t) or is_string(t)


def _list_of(accepts):
    return lambda t: is_list(t) and accepts(value_type(t.value_type))


@dataclass(frozen=True)
class ColumnRole:
    """A column the loader reads, what it is for and which types it accepts."""

    name: str
    kind: str  # label | dense | sparse | multi-hot sparse | weights
    expected: str
    accepts: object  # Callable[[pa.DataType], bool]


def column_roles(cfg: DataConfig, label: bool = True, passthrough: Sequence[str] = ()) -> list[ColumnRole]:
    """Every column the loader reads, in reading order: label (unless ``label`` is False),
    dense, sparse, weights, then the ``passthrough`` columns (any type)."""
    roles = []
    if label:
        roles.append(ColumnRole(cfg.label, "label", "integer, bool or floating",
                                lambda t: _number(t) or pa.types.is_boolean(t)))
    roles += [ColumnRole(c, "dense", "integer or floating", _number) for c in cfg.dense]
    for c in cfg.sparse:
        if c in cfg.multi_hot:
            roles.append(ColumnRole(c, "multi-hot sparse",
                                    "list<integer> or list<string> (data.multi_hot)", _list_of(_id)))
        else:
            roles.append(ColumnRole(c, "sparse", "integer or string", _id))
    for ids, w in cfg.weighted.items():
        if ids in cfg.multi_hot:
            roles.append(ColumnRole(w, "weights", f"list<floating> (weights of {ids!r})",
                                    _list_of(_number)))
        else:
            roles.append(ColumnRole(w, "weights", f"floating (weights of {ids!r})", _number))
    roles += [ColumnRole(c, "pass-through", "any type", lambda t: True) for c in passthrough]
    return roles


class MissingColumnError(ValueError):
    """A file lacks a column the loader reads; ``path``, ``column`` and ``kind`` (the role:
    label, dense, sparse, ..., pass-through) say which, for callers that name their own flag."""

    def __init__(self, path: str, role: ColumnRole, names: list[str] | None = None):
        self.path, self.column, self.kind = path, role.name, role.kind
        super().__init__(f"{path}: missing {role.kind} column {role.name!r}" + (f" (the file has {names})" if names else ""))


def check_schema(path: str, schema: pa.Schema, roles: list[ColumnRole]) -> dict[str, pa.DataType]:
    """Checks one file's schema; returns {column: its Arrow type}.

    Raises:
        MissingColumnError: a column is missing (naming the file and the column).
        ValueError: naming the file, the column, the type found and the type expected.
    """
    found: dict[str, pa.DataType] = {}
    for role in roles:
        idx = schema.get_all_field_indices(role.name)
        if not idx:
            raise MissingColumnError(path, role, schema.names)
        if len(idx) > 1:
            raise ValueError(f"{path}: {role.kind} column {role.name!r} appears {len(idx)} times")
        t = schema.field(idx[0]).type
        if not role.accepts(value_type(t)):
            raise ValueError(
                f"{path}: {role.kind} column {role.name!r} has type {t}, expected {role.expected}"
            )
        found[role.name] = t
    return found


def check_same_schema(
    path: str, types: dict[str, pa.DataType], first_path: str, first: dict[str, pa.DataType]
) -> None:
    """Every file must match the first one's types of the configured columns."""
    for name, t in types.items():
        if value_type(t) != value_type(first[name]):
            raise ValueError(
                f"{path}: column {name!r} has type {t}, but {first_path} has {first[name]}; "
                f"all files must have the same types for the configured columns"
            )
