"""An embedded DuckDB results store: one row per (dataset, task, method, config, protocol, seed, head).

Each row records the version of the code that computed it (``code_version``, with per-module hashes in
``code_modules``) and whether it succeeded (``status`` ``ok`` or ``failed``, with the one-line ``error``).
The store's schema version is kept in a ``store_info`` table; an older store is brought up to date when
opened for writing (keeping every row), read as it is otherwise, and a newer one is refused with a one-line
error.
"""

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
    "code_version": "VARCHAR",
    "code_modules": "VARCHAR",
    "status": "VARCHAR",
    "error": "VARCHAR",
    "modalities": "VARCHAR",
    "threads": "INTEGER",
    "views": "VARCHAR",
}
_JSON_COLUMNS = ("block_r2", "block_mae", "chosen", "code_modules", "modalities", "views")
#: Version of the store layout. 1: the first layout (no ``store_info``); 2: code versions and failed rows;
#: 3: the head joins the key. Opening an older store adds every column of :data:`COLUMNS` that it lacks (new
#: columns are NULL there); a store without ``head`` is rebuilt once with each row's method's own head. Columns
#: outside the key (``threads``, ``views``) are added this way without a new version: older code reads its own.
SCHEMA_VERSION = 3
#: Key columns that an older store may lack (filled in by the migration).
_ADDED_KEYS = ("head",)


class ResultStore:
    """Results in a DuckDB file. Each row is written in its own transaction, so a killed run keeps
    every finished row and a re-run skips them.

    Args:
        path: The ``.duckdb`` file (created with its folder if needed).
    """

    def __init__(self, path: str | Path = DEFAULT_STORE, read_only: bool = False) -> None:
        import duckdb

        self.path = Path(path)
        if read_only and not self.path.is_file():
            raise DataError(f"{self.path}: no results store there (run `urbanprofile benchmark --store {self.path}`)")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as err:
            raise DataError(_open_error(self.path, err)) from None
        try:
            self._absent: set[str] = set()
            self._check_schema(read_only)
        except BaseException:
            self._con.close()
            raise

    def _check_schema(self, read_only: bool) -> None:
        tables = {r[0] for r in self._con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        version = 1 if "results" in tables else SCHEMA_VERSION
        if "store_info" in tables:
            found = self._con.execute("SELECT value FROM store_info WHERE key = 'schema_version'").fetchone()
            version = int(found[0]) if found else version
        if version > SCHEMA_VERSION:
            raise DataError(f"{self.path}: written by a newer urbanprofile (store schema {version}; this one reads "
                            f"up to {SCHEMA_VERSION}): upgrade urbanprofile or use another --store")
        if "results" in tables:
            present = {r[0] for r in self._con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'results'").fetchall()}
            lacking = [k for k in KEY if k not in present and k not in _ADDED_KEYS]
            if lacking:
                raise DataError(f"{self.path}: not a results store (table 'results' has no column {lacking[0]!r})")
            missing = [name for name in COLUMNS if name not in present]
        elif read_only:
            raise DataError(f"{self.path}: not a results store (no table 'results')")
        else:
            missing = []
        self._absent = set(missing)
        if read_only:  # an older store is read as it is: its missing columns read as NULL
            return
        self._con.execute("BEGIN TRANSACTION")
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._con.execute(f"CREATE TABLE IF NOT EXISTS results ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
        if missing and "head" in missing:
            self._rebuild_with_heads(present)
        else:
            for name in missing:  # migration from an older layout: new columns, NULL in old rows
                self._con.execute(f"ALTER TABLE results ADD COLUMN {name} {COLUMNS[name]}")
        self._con.execute("CREATE TABLE IF NOT EXISTS store_info (key VARCHAR PRIMARY KEY, value VARCHAR)")
        self._con.execute("INSERT OR REPLACE INTO store_info VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        self._con.execute("COMMIT")
        self._absent = set()

    def _rebuild_with_heads(self, present: set[str]) -> None:
        """Rebuild a store from before heads were an axis (no ``head`` column, a key without it) with the current
        schema, inside the open transaction, keeping every row: each gets its method's own head (``ridge``, or
        ``knn`` for ``knn-location``; ``ridge`` for methods no longer registered)."""
        shared = [c for c in COLUMNS if c in present]
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._con.execute(f"CREATE TABLE results_migrated ({columns}, PRIMARY KEY ({', '.join(KEY)}))")
        self._con.execute(f"INSERT INTO results_migrated ({', '.join(shared)}, head) "
                          f"SELECT {', '.join(shared)}, 'ridge' FROM results")
        for method, head in _default_heads().items():
            if head != "ridge":
                self._con.execute("UPDATE results_migrated SET head = ? WHERE method = ?", [head, method])
        self._con.execute("DROP TABLE results")
        self._con.execute("ALTER TABLE results_migrated RENAME TO results")

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored(self) -> dict[tuple[Any, ...], tuple[str | None, str | None]]:
        """``(code_version, status)`` of every stored row by key (``None`` in rows of an older store)."""
        rows = self._con.execute(f"SELECT {', '.join(KEY)}, code_version, status FROM results").fetchall()
        return {tuple(r[: len(KEY)]): (r[len(KEY)], r[len(KEY) + 1]) for r in rows}

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

    def put(self, rows: list[dict[str, Any]]) -> None:
        """Write the rows of one finished unit in one transaction, replacing stored rows of the same keys
        (a failed row, or one computed by other code)."""
        if not rows:
            return
        where = " AND ".join(f"{k} = ?" for k in KEY)
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._con.execute("BEGIN TRANSACTION")
        try:
            for row in rows:
                self._con.execute(f"DELETE FROM results WHERE {where}", [row[k] for k in KEY])
                self._con.execute(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                                  [_to_sql(name, row.get(name)) for name in COLUMNS])
            self._con.execute("COMMIT")
        except Exception:
            self._con.execute("ROLLBACK")
            raise

    def rows(self, where: dict[str, Iterable[Any]] | None = None) -> list[dict[str, Any]]:
        """Stored rows, optionally filtered (``{"dataset": ["hafusion-nyc"], ...}``)."""
        sql = "SELECT " + ", ".join("NULL" if c in self._absent else c for c in COLUMNS) + " FROM results"
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
        order = [c for c in ("dataset", "task", "protocol", "method", "head", "seed") if c not in self._absent]
        sql += " ORDER BY " + ", ".join(order)
        out = []
        for record in self._con.execute(sql, params).fetchall():
            row = dict(zip(COLUMNS, record, strict=True))
            for name in _JSON_COLUMNS:
                row[name] = json.loads(row[name]) if row[name] else None
            row["created_at"] = str(row["created_at"])
            if row["head"] is None:  # read from a store written before heads were an axis
                row["head"] = _default_heads().get(row["method"], "ridge")
            out.append(row)
        return out


def _open_error(path: Path, err: Exception) -> str:
    """One line for a store that cannot be opened: locked by another process, another format, or unreadable."""
    import re

    message = str(err)
    if "lock" in message.lower():
        pid = re.search(r"PID (\d+)", message)
        holder = f" (PID {pid.group(1)})" if pid else ""
        return (f"{path}: the results store is in use by another process{holder}; wait for it to finish "
                "or use another --store")
    if "version" in message.lower() or "serialization" in message.lower():
        return f"{path}: written by another DuckDB storage version ({message.splitlines()[0]}); use another --store"
    return f"{path}: cannot open the results store ({message.splitlines()[0]})"


def _to_sql(name: str, value: Any) -> Any:
    if name in _JSON_COLUMNS:
        return json.dumps(value, default=float)
    return value


def _default_heads() -> dict[str, str]:
    """Each registered method's own head (what a row of a store without a ``head`` column was probed with)."""
    from urbanprofile.methods import get_method, list_methods

    return {name: get_method(name).head for name in list_methods()}
