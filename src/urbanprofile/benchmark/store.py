"""An embedded DuckDB results store: one row per (dataset, task, method, config, protocol, seed, head).

Each row records the version of the code that computed it (``code_version``, with per-module hashes in
``code_modules``) and whether it succeeded (``status`` ``ok`` or ``failed``, with the one-line ``error``).
The store's schema version is kept in a ``store_info`` table; an older store is brought up to date when
opened for writing (keeping every row), read as it is otherwise, and a newer one is refused with a one-line
error. The columns are the fields of :class:`urbanprofile.benchmark.rows.ResultRow`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from urbanprofile.benchmark.rows import COLUMNS, JSON_COLUMNS, KEY, ResultRow
from urbanprofile.errors import DataError
from urbanprofile.evaluation.protocols import PROTOCOLS
from urbanprofile.methods import get_method, list_methods

__all__ = ["COLUMNS", "DEFAULT_STORE", "KEY", "SCHEMA_VERSION", "ResultStore", "StoredState", "open_store"]

DEFAULT_STORE = Path("results") / "urbanprofile.duckdb"

#: What the JSON of a column must decode to, where the readers depend on it (``chosen`` varies by head).
_JSON_KINDS: dict[str, type] = {name: kind for name, kind in JSON_COLUMNS.items() if kind is not object}
#: Version of the store layout. 1: the first layout (no ``store_info``); 2: code versions and failed rows;
#: 3: the head joins the key; 4: the dataset's content fingerprint (rows without one are
#: recomputed). Columns outside the key (``threads``, ``views``) are added by the same migration without a new
#: version: older code reads its own. Opening an
#: older store adds every column of :data:`COLUMNS` that it lacks (new columns are NULL there); a store without
#: ``head`` is rebuilt once with each row's method's own head.
SCHEMA_VERSION = 4
#: Key columns that an older store may lack (filled in by the migration).
_ADDED_KEYS = ("head",)


class StoredState(NamedTuple):
    """What decides whether a stored row is reused: the code that computed it (its version and per-module hashes),
    its status, and the content of the dataset it was computed on (``None`` in rows of an older store)."""

    code_version: str | None
    status: str | None
    dataset_fingerprint: str | None
    code_modules: dict[str, str] | None = None


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
        #: Whether this open created the file (a run that fails before writing a row removes it again).
        self.created = not self.path.exists()
        #: Whether the file was an empty one (e.g. from mktemp), which DuckDB refuses to open: it is replaced.
        self.was_empty_file = not read_only and self.path.is_file() and self.path.stat().st_size == 0
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.was_empty_file:
                self.path.unlink()
                self.created = True
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as err:
            raise DataError(_open_error(self.path, err)) from None
        try:
            self._absent: set[str] = set()
            self._check_schema(read_only)
        except duckdb.Error as err:  # e.g. a full disk while creating the tables
            self._con.close()
            raise DataError(f"{self.path}: cannot prepare the results store ({_first_line(err)})") from None
        except BaseException:
            self._con.close()
            raise

    def _check_schema(self, read_only: bool) -> None:
        tables = {r[0] for r in self._con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if tables and not tables & {"results", "store_info"}:
            # Another application's database: adding our tables to it would change a file that is not ours.
            shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
            raise DataError(f"{self.path}: not an urbanprofile results store (it holds other tables: {shown}); "
                            "use another --store")
        version = 1 if "results" in tables else SCHEMA_VERSION
        if "store_info" in tables:
            import duckdb

            try:
                found = self._con.execute("SELECT value FROM store_info WHERE key = 'schema_version'").fetchone()
            except duckdb.Error:
                raise DataError(f"{self.path}: not an urbanprofile results store (its table 'store_info' has no "
                                "key/value columns); use another --store") from None
            if found is not None:
                try:
                    version = int(found[0])
                except (TypeError, ValueError):
                    raise DataError(f"{self.path}: store_info schema_version is {found[0]!r}, not a whole number "
                                    f"(this urbanprofile writes {SCHEMA_VERSION}); was the store edited by hand?"
                                    ) from None
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
        import duckdb

        try:
            self._con.close()
        except duckdb.Error as err:  # the last checkpoint failed (e.g. a full disk); committed rows are in the WAL
            raise DataError(f"{self.path}: cannot close the results store ({_first_line(err)})") from None

    def is_empty(self) -> bool:
        """Whether the store holds no result row."""
        found = self._con.execute("SELECT count(*) FROM results").fetchone()
        return not found or not found[0]

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored(self) -> dict[tuple[Any, ...], StoredState]:
        """The :class:`StoredState` of every stored row by key."""
        state = ", ".join("NULL" if c in self._absent else c for c in StoredState._fields)
        rows = self._con.execute(f"SELECT {', '.join(KEY)}, {state} FROM results").fetchall()
        out = {}
        for *key, version, status, fingerprint, text in rows:
            try:  # hashes that do not read as a module -> hash mapping match no code (the row is recomputed)
                modules = json.loads(text) if text else None
            except ValueError:
                modules = None
            out[tuple(key)] = StoredState(version, status, fingerprint, modules if isinstance(modules, dict) else None)
        return out

    def add(self, row: dict[str, Any]) -> bool:
        """Insert one result in its own transaction; returns False if its key was already stored.

        A row without a ``head`` is a default-head (``ridge``) row, as written by older callers.
        """
        row = {**row, "head": row.get("head") or "ridge"}
        values = _values(row)
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
        import duckdb

        self._con.execute("BEGIN TRANSACTION")
        try:
            for row in rows:
                self._con.execute(f"DELETE FROM results WHERE {where}", [row[k] for k in KEY])
                self._con.execute(f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                                  _values(row))
            self._con.execute("COMMIT")
        except BaseException as err:  # Ctrl-C too: the unit is written whole or not at all
            # A failed COMMIT has already ended the transaction; ROLLBACK would then raise "no transaction is
            # active" and hide the real cause (e.g. no space left on device).
            with contextlib.suppress(duckdb.Error):
                self._con.execute("ROLLBACK")
            if isinstance(err, duckdb.InterruptException):  # Ctrl-C inside a statement
                raise KeyboardInterrupt from None
            if isinstance(err, duckdb.Error | OSError):
                raise DataError(f"{self.path}: cannot write to the results store ({_first_line(err)}); the units "
                                "finished before are kept") from None
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
            for name in JSON_COLUMNS:
                row[name] = self._json(row, name)
            if row["protocol"] not in PROTOCOLS:
                raise DataError(f"{self.path}: row {_describe(row)} has an unknown protocol {row['protocol']!r} "
                                f"(valid: {', '.join(PROTOCOLS)}); was the store edited by hand?")
            if row["status"] not in (None, "ok", "failed"):
                raise DataError(f"{self.path}: row {_describe(row)} has an unknown status {row['status']!r} "
                                "(valid: ok, failed); was the store edited by hand?")
            row["created_at"] = str(row["created_at"])
            if row["head"] is None:  # read from a store written before heads were an axis
                row["head"] = _default_heads().get(row["method"], "ridge")
            out.append(row)
        return out

    def _json(self, row: dict[str, Any], name: str) -> Any:
        """The decoded JSON of one column of a row, or a one-line error naming the store, row and column."""
        text = row[name]
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError as err:
            raise DataError(f"{self.path}: row {_describe(row)}: column {name} is not valid JSON ({err}); was the "
                            "store edited by hand?") from None
        expected = _JSON_KINDS.get(name)
        if expected is not None and value is not None and not isinstance(value, expected):
            raise DataError(f"{self.path}: row {_describe(row)}: column {name} holds a JSON "
                            f"{type(value).__name__}, not a{'' if expected is list else 'n'} "
                            f"{'array' if expected is list else 'object'}; was the store edited by hand?")
        return value


@contextlib.contextmanager
def open_store(path: str | Path) -> Iterator[ResultStore]:
    """The store for one run. If the run fails (a user error, Ctrl-C) before any row is written to a store file
    that this open created, the file is removed again, so a mistake leaves no empty store behind."""
    store = ResultStore(path)
    try:
        yield store
    except BaseException:
        discard = False
        with contextlib.suppress(Exception):
            discard = store.created and store.is_empty()
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            store.close()
        if discard:
            for leftover in (store.path, store.path.with_name(store.path.name + ".wal")):
                leftover.unlink(missing_ok=True)
            if store.was_empty_file:
                store.path.touch()  # as it was before the run
        raise
    store.close()


def _describe(row: dict[str, Any]) -> str:
    """A stored row named by its key, for an error message."""
    return "(" + ", ".join(f"{k}={row.get(k)!r}" for k in KEY) + ")"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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


def _values(row: dict[str, Any]) -> list[Any]:
    """A row's values in the order of :data:`COLUMNS`, JSON columns as text (a key that is no column raises)."""
    typed = ResultRow.from_dict(row)
    return [json.dumps(value, default=float) if name in JSON_COLUMNS else value
            for name, value in ((name, getattr(typed, name)) for name in COLUMNS)]


def _default_heads() -> dict[str, str]:
    """Each registered method's own head (what a row of a store without a ``head`` column was probed with)."""
    return {name: get_method(name).head for name in list_methods()}
