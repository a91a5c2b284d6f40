"""Task suites: planning their pairs, skipping what is absent, and the aggregate per method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.data import CityData
from urbanprofile.errors import UnknownNameError
from urbanprofile.evaluation.suites import SUITES, Suite, get_suite, plan_suite, suite_aggregate, wins_text


def test_named_suites_and_unknown_name() -> None:
    assert set(SUITES) == {"core", "socioeconomic", "all"}
    assert get_suite("core").pairs["hafusion-nyc"] == ("checkin", "crime", "service_calls")
    assert "acs_poverty" in get_suite("socioeconomic").pairs["hafusion-nyc"]
    assert any("vary between NTAs only" in c for c in get_suite("all").caveats) and not get_suite("core").caveats
    assert get_suite("socioeconomic").pairs["cityview-guangzhou"] == ("carbon", "population", "gdp")
    # CityView's indicators belong to both suites; the union counts each pair once.
    union = {(d, t) for s in ("core", "socioeconomic") for d, tasks in get_suite(s).pairs.items() for t in tasks}
    assert get_suite("all").n_pairs == len(union)
    with pytest.raises(UnknownNameError, match="did you mean 'core'"):
        get_suite("cores")


def test_plan_suite_skips_absent_datasets_pair_by_pair() -> None:
    pairs, skipped = plan_suite(get_suite("core"), ["hafusion-nyc", "olinda"])
    assert pairs == {"hafusion-nyc": ("checkin", "crime", "service_calls")}
    assert "hafusion-chicago checkin: dataset not in the data directory (suite core)" in skipped
    assert len(skipped) == 9
    pairs, skipped = plan_suite(get_suite("core"), ["hafusion-nyc", "olinda"], ["olinda", "hafusion-nyc"])
    assert list(pairs) == ["hafusion-nyc"] and any("olinda: not part of suite 'core'" in s for s in skipped)


def _row(dataset: str, task: str, method: str, r2: float, seed: int = 0, protocol: str = "nested") -> dict:
    return {"dataset": dataset, "task": task, "method": method, "head": "ridge", "protocol": protocol, "seed": seed,
            "r2": r2, "status": "ok"}


def test_aggregate_means_ranks_and_wins_over_common_pairs() -> None:
    suite = Suite("toy", "", {"a": ("t1", "t2", "t3"), "b": ("t1",)})
    rows = [
        _row("a", "t1", "raw-x", 0.5), _row("a", "t1", "raw-y", 0.6), _row("a", "t1", "learned", 0.7, 0),
        _row("a", "t1", "learned", 0.9, 1),  # seeds are averaged: 0.8
        _row("a", "t2", "raw-x", 0.4), _row("a", "t2", "raw-y", 0.1), _row("a", "t2", "learned", 0.3),
        _row("a", "t3", "raw-x", 0.2), _row("a", "t3", "raw-y", 0.3), _row("a", "t3", "learned", 0.6),
        _row("b", "t1", "raw-x", 0.9), _row("b", "t1", "learned", 0.1),  # raw-y did not run: not common
        _row("c", "t1", "raw-x", 0.9),  # not in the suite
        {**_row("a", "t2", "other", 0.99), "status": "failed"},
    ]
    board = suite_aggregate(rows, suite).set_index("method")
    assert (board["n_common"] == 3).all()
    assert board.loc["learned", "n_pairs"] == 4 and board.loc["raw-y", "n_pairs"] == 3
    assert board.loc["learned", "mean_r2"] == pytest.approx((0.8 + 0.3 + 0.6) / 3)
    assert board.loc["learned", "mean_rank"] == pytest.approx((1 + 2 + 1) / 3)
    assert board.loc["raw-y", "mean_rank"] == pytest.approx((2 + 3 + 2) / 3)
    assert board.loc["learned", "wins"] == 2 and board.loc["learned", "n_compared"] == 3
    assert board.loc["raw-x", "wins"] == 1  # against raw-y, the only other raw baseline
    for method in board.index:
        assert board.loc[method, "rank_low"] <= board.loc[method, "mean_rank"] <= board.loc[method, "rank_high"]
    assert board.index[0] == "learned"
    again = suite_aggregate(rows, suite).set_index("method")
    np.testing.assert_allclose(again["rank_low"], board["rank_low"])  # the bootstrap is seeded


def test_wins_read_as_a_dash_where_there_is_no_other_raw_baseline() -> None:
    rows = [_row("a", "t1", "raw-x", 0.5), _row("a", "t1", "learned", 0.7),
            _row("a", "t2", "raw-x", 0.4), _row("a", "t2", "learned", 0.3)]
    board = suite_aggregate(rows).set_index("method")
    assert wins_text(board.loc["learned"].to_dict()) == "1/2"  # beats raw-x on t1 only
    assert board.loc["raw-x", "n_compared"] == 0 and wins_text(board.loc["raw-x"].to_dict()) == "-"
    alone = suite_aggregate([_row("a", "t1", "learned", 0.7)]).iloc[0].to_dict()  # no raw baseline at all
    assert wins_text(alone) == "-"


def test_runner_runs_each_dataset_tasks_and_says_what_is_missing(city: CityData) -> None:
    plan = BenchmarkPlan(datasets=[city.name], methods=["raw-poi"], protocols=["nested"], seeds=[0],
                         dataset_tasks={city.name: ["crime", "acs_poverty"]})
    outcome = run_benchmark(plan, cities={city.name: city}, progress=False)
    assert [r["task"] for r in outcome.rows] == ["crime"]
    assert any("no task 'acs_poverty'" in line for line in outcome.skipped)


def test_cli_suite_runs_the_rest_and_prints_the_aggregate(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("benchmark", "--suite", "core,nope", "--datasets", "hafusion-nyc", "--methods", "raw-poi,pca",
                     "--protocols", "nested", "--seeds", "0", "--json", "--store", str(tmp_path / "s.duckdb"),
                     data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "skipped: suite 'nope': unknown" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    aggregate = [r for r in rows if r.get("row") == "suite-aggregate"]
    assert {r["method"] for r in aggregate} == {"raw-poi", "pca"}
    assert all(r["suite"] == "core" and r["n_common"] == 3 for r in aggregate)
    assert len([r for r in rows if r.get("row") != "suite-aggregate"]) == 6
    from urbanprofile.report.html import write_report

    page = write_report(tmp_path / "s.duckdb", tmp_path / "report", with_maps=False).path.read_text(encoding="utf-8")
    assert "suite <b>core</b> · protocol <b>nested</b>" in page and "3 of 12 pairs" in page
    assert_user_error(run_cli("benchmark", "--suite", "cor", "--store", str(tmp_path / "t.duckdb"),
                              data_dir=data_dir), "unknown suite 'cor'", "did you mean 'core'")
    assert not (tmp_path / "t.duckdb").exists()
