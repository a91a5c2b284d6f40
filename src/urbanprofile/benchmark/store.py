"""An embedded DuckDB results store: one row per (dataset, task, method, config, protocol, seed, head)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from urbanprofile.errors import DataError

DEFAULT_STORE = Path("results") / "urbanprofile.duckdb"

KEY = ("dataset", "task", "method", "config_hash", "protocol", "seed", "head")
COLUMNS: dict[str, str] = {
    "dataset": "VARCHAR",
    "task": "VARCHAR",
    "method": "VARCHAR",
    "config_hash": "VARCHAR",
    "protocol": "VARCHAR",
    "seed": "INTEGER",
    "head": "VARCHAR",
    "n_regions": "INTEGER",
    "mae": "DOUBLE",
    "rmse": "DOUBLE",
    "r2": "DOUBLE",
    "worst_block_r2": "DOUBLE",
    "r2_gap": "DOUBLE",
    "worst_block_mae": "DOUBLE",
    "morans_i": "DOUBLE",
    "bias_weights": "VARCHAR",
    "block_r2": "VARCHAR",
    "block_mae": "VARCHAR",
    "chosen": "VARCHAR",
    "embed_seconds": "DOUBLE",
    "head_seconds": "DOUBLE",
    "fit_seconds": "DOUBLE",
    "package_version": "VARCHAR",
    "created_at": "TIMESTAMP",
}
_JSON_COLUMNS = ("block_r2", "block_mae", "chosen")


class ResultStore:
    """Results in a DuckDB file. Each row is written in its own transaction, so a killed run keeps
    every finished row and a re-run skips them.

    Args:
        path: The ``.duckdb`` file (created with its folder if needed).
    """

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        import duckdb

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.Error as err:
            raise DataError(f"{self.path}: cannot open the results store ({str(err).splitlines()[0]})") from None
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._con.execute(f"CREATE TABLE IF NOT EXISTS results ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
        self._migrate()

    def _migrate(self) -> None:
        """Bring a store written by an older version up to the current columns, keeping every row.

        Stores from before heads were an axis have no ``head`` column (and a key without it): the table is
        rebuilt with the current schema in one transaction, and each old row gets its method's own head
        (``ridge``, or ``knn`` for ``knn-location``; ``ridge`` for methods no longer registered).
        """
        have = {r[0] for r in self._con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'results'").fetchall()}
        if "head" in have:
            return
        from urbanprofile.methods import get_method, list_methods

        heads = {name: get_method(name).head for name in list_methods()}
        shared = [c for c in COLUMNS if c in have]
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute(f"CREATE TABLE results_migrated ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
            self._con.execute(
                f"INSERT INTO results_migrated ({', '.join(shared)}, head) "
                f"SELECT {', '.join(shared)}, 'ridge' FROM results"
            )
            for method, head in heads.items():
                if head != "ridge":
                    self._con.execute("UPDATE results_migrated SET head = ? WHERE method = ?", [head, method])
            self._con.execute("DROP TABLE results")
            self._con.execute("ALTER TABLE results_migrated RENAME TO results")
            self._con.execute("COMMIT")
        except Exception:
            self._con.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_keys(self) -> set[tuple[Any, ...]]:
        """Keys of the rows already stored."""
        rows = self._con.execute(f"SELECT {', '.join(KEY)} FROM results").fetchall()
        return {tuple(r) for r in rows}

    def add(self, row: dict[str, Any]) -> bool:
        """Insert one result in its own transaction; returns False if its key was already stored.

        A row without a ``head`` is a default-head (``ridge``) row, as written by older callers.
        """
        row = {**row, "head": row.get("head") or "ridge"}
        values = [_to_sql(name, row.get(name)) for name in COLUMNS]
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._con.execute("BEGIN TRANSACTION")
        try:
            exists = self._con.execute(
                f"SELECT count(*) FROM results WHERE {' AND '.join(f'{k} = ?' for k in KEY)}",
                [row[k] for k in KEY],
            ).fetchone()
            if exists and exists[0]:
                self._con.execute("ROLLBACK")
                return False
            self._con.execute(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})", values)
            self._con.execute("COMMIT")
        except Exception:
            self._con.execute("ROLLBACK")
            raise
        return True

    def rows(self, where: dict[str, Iterable[Any]] | None = None) -> list[dict[str, Any]]:
        """Stored rows, optionally filtered (``{"dataset": ["hafusion-nyc"], ...}``)."""
        sql = f"SELECT {', '.join(COLUMNS)} FROM results"
        params: list[Any] = []
        clauses = []
        for column, allowed in (where or {}).items():
            allowed = list(allowed)
            if column not in COLUMNS:
                raise ValueError(f"unknown column {column!r}")
            clauses.append(f"{column} IN ({', '.join('?' for _ in allowed)})")
            params += allowed
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY dataset, task, protocol, method, head, seed"
        out = []
        for record in self._con.execute(sql, params).fetchall():
            row = dict(zip(COLUMNS, record, strict=True))
            for name in _JSON_COLUMNS:
                row[name] = json.loads(row[name]) if row[name] else None
            row["created_at"] = str(row["created_at"])
            out.append(row)
        return out


def _to_sql(name: str, value: Any) -> Any:
    if name in _JSON_COLUMNS:
        return json.dumps(value, default=float)
    return value
