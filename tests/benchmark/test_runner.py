"""The benchmark runner and its DuckDB store: resuming, no duplicates, and the CLI on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from urbanprofile.benchmark.runner import BenchmarkPlan, leaderboard, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data import CityData


def test_resume_skips_finished_rows(city: CityData, tmp_path: Path) -> None:
    cities = {"synthetic": city}
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "autoencoder"], tasks=["crime"],
                         protocols=["nested", "spatial"], seeds=[0, 1])
    with ResultStore(tmp_path / "r.duckdb") as store:
        # A first run that stops after part of the grid (only one seed) ...
        part = run_benchmark(BenchmarkPlan(**{**plan.__dict__, "seeds": [0]}), store=store, progress=False,
                             cities=cities)
        assert len(part.rows) == 4
        # ... is completed by the full run, which computes only what is missing.
        full = run_benchmark(plan, store=store, progress=False, cities=cities)
        assert len(full.rows) == 2 and full.n_resumed == 4  # raw-poi is deterministic: one seed only
        again = run_benchmark(plan, store=store, progress=False, cities=cities)
        assert again.rows == [] and again.n_resumed == 6
        rows = store.rows()
    assert len(rows) == 6
    keys = {(r["method"], r["protocol"], r["seed"]) for r in rows}
    assert len(keys) == 6
    board = leaderboard(rows)
    auto = board[(board.method == "autoencoder") & (board.protocol == "nested")].iloc[0]
    assert auto["n_seeds"] == 2 and auto["r2_std"] >= 0


def test_store_refuses_duplicates(tmp_path: Path) -> None:
    row = {"dataset": "d", "task": "t", "method": "m", "config_hash": "h", "protocol": "nested", "seed": 0,
           "r2": 0.5}
    with ResultStore(tmp_path / "r.duckdb") as store:
        assert store.add(row) is True
        assert store.add({**row, "r2": 0.9}) is False
        assert [r["r2"] for r in store.rows()] == [0.5]


def test_datasets_list_does_not_import_torch(data_dir: Path) -> None:
    code = (
        "import sys; sys.argv = ['urbanprofile', 'datasets', 'list'];"
        "from urbanprofile.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={"URBANPROFILE_DATA": str(data_dir), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "hafusion-nyc" in result.stdout


def test_benchmark_cli_json_and_resume(data_dir: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "urbanprofile.cli", "benchmark", "--datasets", "hafusion-chicago",
            "--methods", "raw-poi,knn-location", "--tasks", "checkin", "--protocols", "paper,nested",
            "--store", str(tmp_path / "r.duckdb"), "--json", "--data-dir", str(data_dir)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == 4
    for key in ("dataset", "task", "method", "protocol", "seed", "n_regions", "mae", "rmse", "r2", "fit_seconds"):
        assert key in rows[0]
    paper = next(r for r in rows if r["method"] == "raw-poi" and r["protocol"] == "paper")
    assert round(paper["r2"], 3) == 0.915 and paper["n_regions"] == 74
    assert not any(r["resumed"] for r in rows)
    # A re-run computes nothing and still prints every requested row, marked as resumed.
    second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    again = [json.loads(line) for line in second.stdout.splitlines()]
    assert all(r["resumed"] for r in again) and "0 new results, 4 already in" in second.stderr
    assert sorted((r["method"], r["protocol"], r["r2"]) for r in again) == sorted(
        (r["method"], r["protocol"], r["r2"]) for r in rows)
    # Piped, the leaderboard is printed whole: no number cut to fit 80 columns.
    assert "0.915" in second.stderr and "…" not in second.stderr
