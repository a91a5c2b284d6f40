"""Reuse keyed on the method's code version, store schema migration, and stores that cannot be opened."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.benchmark.runner import BenchmarkPlan, describe_recomputed, run_benchmark
from urbanprofile.benchmark.store import COLUMNS, KEY, ResultStore
from urbanprofile.benchmark.versions import code_version, module_closure
from urbanprofile.data import CityData
from urbanprofile.errors import DataError

PLAN = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "pca"], tasks=["crime"],
                     protocols=["paper", "nested"], seeds=[0])


def test_code_version_covers_the_method_and_the_evaluation() -> None:
    raw = code_version("urbanprofile.embedders.baselines.raw:RawViews")
    srel = code_version("urbanprofile.embedders.multiview.srel:SRELEmbedder")
    assert {"urbanprofile.embedders.baselines.raw", "urbanprofile.evaluation.protocols", "urbanprofile.heads.probes",
            "urbanprofile.data.city"} <= set(raw.modules)
    assert {"urbanprofile.embedders.multiview.layers", "urbanprofile.embedders.multiview.srel"} <= set(srel.modules)
    assert "urbanprofile.embedders.multiview.srel" not in raw.modules  # another method's code is not this one's
    closure = module_closure(("urbanprofile.embedders.baselines.raw",))
    assert not [m for m in closure if m.startswith("urbanprofile.data.build")]  # the builder is no method's code
    assert raw.version != srel.version and len(raw.version) == 12
    assert srel.changed_modules({**srel.modules, "urbanprofile.embedders.multiview.layers": "0" * 12}) == [
        "urbanprofile.embedders.multiview.layers"]


def test_rows_from_other_code_are_recomputed_and_reported(city: CityData, tmp_path: Path) -> None:
    cities = {"synthetic": city}
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        first = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        assert len(first.rows) == 4 and all(r["status"] == "ok" for r in first.rows)
        same = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        assert same.rows == [] and same.n_resumed == 4 and len(same.resumed_rows) == 4
    # The rows of pca were computed by other code: one module differs, and one R² is off.
    con = duckdb.connect(str(path))
    modules = dict(code_version("urbanprofile.embedders.baselines.pca:PCAEmbedder").modules)
    modules["urbanprofile.embedders.baselines.pca"] = "0" * 12
    import json

    con.execute("UPDATE results SET code_version = 'older', code_modules = ?, r2 = r2 - 0.25 WHERE method = 'pca'",
                [json.dumps(modules)])
    con.close()
    with ResultStore(path) as store:
        again = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        stored = store.rows()
    assert again.n_resumed == 2 and {r["method"] for r in again.rows} == {"pca"}
    assert len(again.recomputed) == 2
    lines = describe_recomputed(again)
    assert len(lines) == 1 and "pca: 2 stored rows came from other code" in lines[0]
    assert "baselines.pca" in lines[0] and "R² moved by up to 0.250" in lines[0]
    assert len(stored) == 4 and {r["code_version"] for r in stored if r["method"] == "pca"} == {
        code_version("urbanprofile.embedders.baselines.pca:PCAEmbedder").version}
    first_pca = {r["protocol"]: r["r2"] for r in first.rows if r["method"] == "pca"}
    assert {r["protocol"]: r["r2"] for r in again.rows} == first_pca  # the same code gives the same numbers


def _old_store(path: Path) -> None:
    """A store in the first layout (no code versions, no status, no store_info)."""
    old = {k: v for k, v in COLUMNS.items()
           if k not in ("code_version", "code_modules", "status", "error", "head", "modalities")}
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE results ({', '.join(f'{k} {v}' for k, v in old.items())}, "
                f"PRIMARY KEY ({', '.join(k for k in KEY if k != 'head')}))")
    con.execute("INSERT INTO results (dataset, task, method, config_hash, protocol, seed, r2) VALUES "
                "('synthetic', 'crime', 'raw-poi', ?, 'paper', 0, 0.5)",
                [__import__("urbanprofile.methods").methods.get_method("raw-poi").config_hash])
    con.close()


def test_older_store_is_migrated_and_its_rows_recomputed(city: CityData, tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    _old_store(path)
    with ResultStore(path, read_only=True) as old:  # read as it is (the report reads stores read-only)
        [row] = old.rows()
        assert row["r2"] == 0.5 and row["status"] is None and row["code_version"] is None
    with ResultStore(path) as store:
        assert [r["r2"] for r in store.rows()] == [0.5]  # nothing lost
        outcome = run_benchmark(PLAN, store=store, progress=False, cities={"synthetic": city})
        assert len(outcome.recomputed) == 1 and "recorded no code version" in describe_recomputed(outcome)[0]
        assert len(store.rows()) == 4
    with ResultStore(path, read_only=True) as store:
        assert all(r["status"] == "ok" for r in store.rows())


def test_store_from_a_newer_version_or_locked_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.duckdb"
    ResultStore(newer).close()
    con = duckdb.connect(str(newer))
    con.execute("UPDATE store_info SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(DataError, match=r"newer urbanprofile \(store schema 99"):
        ResultStore(newer)
    not_duckdb = tmp_path / "notes.duckdb"
    not_duckdb.write_text("these are my notes\n" * 100)
    with pytest.raises(DataError, match=r"notes\.duckdb"):
        ResultStore(not_duckdb)
    assert not_duckdb.read_text().startswith("these are my notes")  # nothing overwritten

    locked = tmp_path / "locked.duckdb"
    with ResultStore(locked) as store:
        store.add({"dataset": "d", "task": "t", "method": "m", "config_hash": "h", "protocol": "nested", "seed": 0,
                   "r2": 0.5})
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(locked)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(DataError, match=f"in use by another process \\(PID {holder.pid}\\)"):
            ResultStore(locked)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with ResultStore(locked) as store:
        assert [r["r2"] for r in store.rows()] == [0.5]  # nothing lost


def test_cli_locked_store_is_one_line(make_data_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = make_data_dir()
    locked = tmp_path / "busy.duckdb"
    ResultStore(locked).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(locked)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        result = run_cli("benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--tasks", "crime",
                         "--store", str(locked), data_dir=data)
        assert_user_error(result, "busy.duckdb", "in use by another process", str(holder.pid))
    finally:
        holder.kill()
        holder.wait()


def test_comment_and_docstring_edits_keep_the_code_hash() -> None:
    from urbanprofile.benchmark.versions import normalised_source_hash

    original = 'def f(x):\n    """Doc."""\n    return x + 1  # add one\n'
    reworded = '# a new comment\ndef f(x):\n    """Another docstring,\n    longer."""\n\n    return x + 1\n'
    changed = 'def f(x):\n    """Doc."""\n    return x + 2  # add one\n'
    assert normalised_source_hash(original) == normalised_source_hash(reworded)
    assert normalised_source_hash(original) != normalised_source_hash(changed)
    only_docstring = 'class A:\n    """Doc."""\n'
    assert normalised_source_hash(only_docstring) != normalised_source_hash("class A:\n    x = 1\n")
