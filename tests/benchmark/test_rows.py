"""The typed result row: the store's schema is its fields, every row is made in one place, values round-trip."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from urbanprofile.benchmark.rows import COLUMNS, KEY, ResultRow, make_row
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.benchmark.unit import Unit, failed_rows, result_row
from urbanprofile.data import CityData
from urbanprofile.evaluation.protocols import evaluate_embedding
from urbanprofile.methods import get_method

#: The store's schema as written by every store so far (schema 4): the dataclass must keep it, name, type and order.
SCHEMA_4 = {
    "dataset": "VARCHAR", "task": "VARCHAR", "method": "VARCHAR", "config_hash": "VARCHAR", "protocol": "VARCHAR",
    "seed": "INTEGER", "head": "VARCHAR", "n_regions": "INTEGER", "mae": "DOUBLE", "rmse": "DOUBLE", "r2": "DOUBLE",
    "worst_block_r2": "DOUBLE", "r2_gap": "DOUBLE", "worst_block_mae": "DOUBLE", "morans_i": "DOUBLE",
    "bias_weights": "VARCHAR", "block_r2": "VARCHAR", "block_mae": "VARCHAR", "chosen": "VARCHAR",
    "embed_seconds": "DOUBLE", "head_seconds": "DOUBLE", "fit_seconds": "DOUBLE", "package_version": "VARCHAR",
    "created_at": "TIMESTAMP", "code_version": "VARCHAR", "code_modules": "VARCHAR", "status": "VARCHAR",
    "error": "VARCHAR", "modalities": "VARCHAR", "dataset_fingerprint": "VARCHAR",
    "threads": "INTEGER", "views": "VARCHAR",
}


def test_the_columns_are_the_fields_of_the_row() -> None:
    assert list(COLUMNS.items()) == list(SCHEMA_4.items())
    assert [f.name for f in dataclasses.fields(ResultRow)] == list(COLUMNS)
    assert tuple(f.name for f in dataclasses.fields(ResultRow))[: len(KEY)] == KEY
    with pytest.raises(TypeError, match="not result row columns: r_2"):
        ResultRow.from_dict({"dataset": "d", "task": "t", "method": "m", "config_hash": "h", "protocol": "paper",
                             "seed": 0, "r_2": 0.5})


def test_rows_from_a_result_and_failed_rows_round_trip_through_the_store(city: CityData, tmp_path: Path) -> None:
    spec = get_method("raw-poi")
    embedding = spec.build(random_state=0).fit_transform(city)
    result = evaluate_embedding(city, embedding, "crime", "nested", "ridge", 0)
    ok = result_row(city, spec, 0, result, 0.25, fingerprint="f" * 16)
    assert set(ok) == set(COLUMNS) and ok["status"] == "ok" and ok["error"] is None
    assert (ok["mae"], ok["rmse"], ok["r2"]) == (result.metrics["mae"], result.metrics["rmse"], result.metrics["r2"])
    assert ok["worst_block_r2"] == result.bias["worst_block_r2"] and ok["block_r2"] == result.bias["block_r2"]
    assert ok["fit_seconds"] == 0.25 + result.head_seconds and ok["n_regions"] == len(city.region_ids)
    failed = failed_rows(Unit("synthetic", spec, 0, (("checkin", "paper", "ridge"),), "f" * 16),
                         "TrainingError: the loss\n  became nan")
    [bad] = failed
    assert set(bad) == set(COLUMNS) and bad["status"] == "failed"
    assert bad["error"] == "TrainingError: the loss became nan"
    assert bad["r2"] is None and bad["code_version"] == ok["code_version"]  # one head, one code version
    with ResultStore(tmp_path / "r.duckdb") as store:
        store.put([ok, *failed])
        back = {r["task"]: r for r in store.rows()}
    for row in (ok, bad):
        stored = back[row["task"]]
        for name in COLUMNS:
            if name == "created_at":
                assert stored[name] == str(row[name])
            elif isinstance(row[name], float) and math.isnan(row[name]):
                assert math.isnan(stored[name])
            else:
                assert stored[name] == row[name], name


def test_a_row_has_no_figures_it_was_not_given() -> None:
    spec = get_method("raw-poi")
    row = make_row("d", spec, 3, "crime", "paper", "ridge", error="")
    assert row.status == "failed" and row.error == "failed" and row.seed == 3
    assert all(getattr(row, m) is None for m in ("mae", "rmse", "r2", "n_regions", "chosen", "fit_seconds"))

