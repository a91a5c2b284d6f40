"""The result row: one typed record per (dataset, task, method, config, protocol, seed, head), the store's schema.

Every row, computed or failed, is made by :func:`make_row`; the store's columns are :class:`ResultRow`'s fields
(:data:`COLUMNS`), so a new figure is one field here and the store gains its column on the next open.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from urbanprofile import __version__
from urbanprofile.benchmark.versions import code_version
from urbanprofile.heads.registry import DEFAULT_HEAD
from urbanprofile.threads import current_threads

if TYPE_CHECKING:
    from urbanprofile.evaluation.protocols import ProtocolResult
    from urbanprofile.methods import MethodSpec

#: Key columns: a row per value of these.
KEY = ("dataset", "task", "method", "config_hash", "protocol", "seed", "head")


@dataclass
class ResultRow:
    """One result: the key, the figures of the protocol, the bias figures, timings and provenance.

    Lists, mappings and ``Any`` fields are stored as JSON text; the others as the DuckDB type of theirs.

    A failed row has the key and provenance, ``status="failed"``, the one-line ``error`` and no figures.
    Figures are ``None`` where a row does not have them (failed rows, rows of an older store).
    """

    dataset: str
    task: str
    method: str
    config_hash: str
    protocol: str
    seed: int
    head: str = DEFAULT_HEAD
    n_regions: int | None = None
    mae: float | None = None
    rmse: float | None = None
    r2: float | None = None
    worst_block_r2: float | None = None
    r2_gap: float | None = None
    worst_block_mae: float | None = None
    morans_i: float | None = None
    #: Where the spatial weights of Moran's I came from (or why there are none).
    bias_weights: str | None = None
    block_r2: dict[str, float] | None = None
    block_mae: dict[str, float] | None = None
    #: What the protocol chose per outer fold (settings, epochs); its shape varies by head (read back unchecked).
    chosen: Any = None
    embed_seconds: float | None = None
    head_seconds: float | None = None
    fit_seconds: float | None = None
    package_version: str | None = None
    created_at: dt.datetime | None = None
    code_version: str | None = None
    code_modules: dict[str, str] | None = None
    status: str | None = None
    error: str | None = None
    modalities: list[str] | None = None
    dataset_fingerprint: str | None = None
    #: Threads each process computed with (:mod:`urbanprofile.threads`).
    threads: int | None = None
    #: The views the method read (a city may lack some of a method's views).
    views: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain mapping of column to value (what the runner passes on and the store writes)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ResultRow:
        """A row from a mapping of column to value; a key that is no column is a programming error.

        Raises:
            TypeError: If ``row`` has a key that is no column, or lacks a key column.
        """
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise TypeError(f"not result row columns: {', '.join(unknown)}")
        return cls(**row)


_SQL_TYPES = {str: "VARCHAR", int: "INTEGER", float: "DOUBLE", dt.datetime: "TIMESTAMP"}


def _kind(hint: Any) -> Any:
    """The type of a field without ``| None``, its container (``dict``, ``list``) for a generic one."""
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if typing.get_origin(hint) else [hint]
    kind = kinds[0] if len(kinds) == 1 else hint
    return typing.get_origin(kind) or kind


_KINDS = {name: _kind(hint) for name, hint in typing.get_type_hints(ResultRow).items()}
#: Columns stored as JSON text, with what their JSON must decode to (``object``: anything).
JSON_COLUMNS: dict[str, type] = {
    name: object if kind is Any else kind for name, kind in _KINDS.items() if kind in (dict, list, Any)}
#: Column name -> DuckDB type, in the order of :class:`ResultRow`'s fields.
COLUMNS: dict[str, str] = {
    f.name: "VARCHAR" if f.name in JSON_COLUMNS else _SQL_TYPES[_KINDS[f.name]] for f in dataclasses.fields(ResultRow)}


def make_row(
    dataset: str, spec: MethodSpec, seed: int, task: str, protocol: str, head: str, *,
    result: ProtocolResult | None = None, embed_seconds: float = 0.0, error: str | None = None,
    fingerprint: str | None = None,
) -> ResultRow:
    """The row of one cell: from a protocol's result, or, with ``error``, a failed row that says why in one line.

    Args:
        dataset: The dataset's identity (:func:`urbanprofile.benchmark.runner.dataset_identity`).
        spec: The method.
        seed: The method's seed.
        task: The task.
        protocol: The protocol.
        head: The head.
        result: The protocol's result (``None`` for a failed row).
        embed_seconds: Seconds the embedding took.
        error: Why the cell failed.
        fingerprint: The dataset's content fingerprint.
    """
    version = code_version(spec.factory, head)
    row = ResultRow(
        dataset=dataset, task=task, method=spec.name, config_hash=spec.config_hash, protocol=protocol,
        seed=int(seed), head=head, package_version=__version__,
        created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None), code_version=version.version,
        code_modules=version.modules, dataset_fingerprint=fingerprint, threads=current_threads(),
        views=list(spec.all_views) or None,
    )
    if result is None:
        row.status, row.error = "failed", " ".join((error or "failed").split())
        return row
    bias = result.bias
    row.modalities = list(spec.params["modalities"]) if spec.params.get("modalities") else None
    row.n_regions = result.n_regions
    row.mae, row.rmse, row.r2 = result.metrics["mae"], result.metrics["rmse"], result.metrics["r2"]
    row.worst_block_r2, row.r2_gap = bias["worst_block_r2"], bias["r2_gap"]
    row.worst_block_mae, row.morans_i = bias["worst_block_mae"], bias["morans_i"]
    row.bias_weights, row.block_r2, row.block_mae = bias["weights"], bias["block_r2"], bias["block_mae"]
    row.chosen = result.chosen
    row.embed_seconds, row.head_seconds = embed_seconds, result.head_seconds
    row.fit_seconds = embed_seconds + result.head_seconds
    row.status = "ok"
    return row
