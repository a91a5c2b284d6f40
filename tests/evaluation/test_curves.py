"""Label efficiency through the evaluation path: probes fit on a seeded, nested share of each outer training fold."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import run_cli as run_in_process

from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.data import CityData
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation import evaluate_embedding, outer_splits
from urbanprofile.evaluation import protocols as protocols_module
from urbanprofile.evaluation.protocols import MIN_TRAIN_REGIONS, subsample_train
from urbanprofile.heads import probes
from urbanprofile.methods import get_method


@pytest.fixture
def embedding(city: CityData) -> pd.DataFrame:
    return get_method("raw-poi").build(random_state=0).fit_transform(city)


def test_subsets_are_seeded_and_nested() -> None:
    train = np.arange(3, 203, 2)  # 100 training rows, not 0..n-1, so positions and ids differ
    subsets = {f: subsample_train(train, f, random_state=7, fold=2) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(s) for s in subsets.values()] == [10, 25, 50, 100]
    assert set(subsets[0.1]) < set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[1.0])
    assert set(subsets[1.0]) == set(train) and subsets[1.0] is train  # the whole fold is the fold itself
    assert np.array_equal(subsets[0.25], subsample_train(train, 0.25, random_state=7, fold=2))
    assert not np.array_equal(subsets[0.25], subsample_train(train, 0.25, random_state=8, fold=2))
    assert not np.array_equal(subsets[0.25], subsample_train(train, 0.25, random_state=7, fold=3))
    assert np.all(np.diff(subsets[0.25]) > 0)  # kept in the fold's order


@pytest.mark.parametrize("protocol", ["nested", "spatial"])
def test_whole_fold_is_the_normal_figure_exactly(city: CityData, embedding: pd.DataFrame, protocol: str) -> None:
    normal = evaluate_embedding(city, embedding, "crime", protocol, random_state=3)
    full = evaluate_embedding(city, embedding, "crime", protocol, random_state=3, train_fraction=1.0)
    assert np.array_equal(normal.pred, full.pred)
    assert normal.metrics == full.metrics and normal.chosen == full.chosen
    folds = outer_splits(city, task_data(city, "crime"), protocol)
    assert full.n_train == [len(train) for train, _ in folds] and full.train_fraction == 1.0


@pytest.mark.parametrize("protocol", ["nested", "spatial"])
def test_test_folds_unchanged_and_every_region_predicted(
    city: CityData, embedding: pd.DataFrame, protocol: str
) -> None:
    normal = evaluate_embedding(city, embedding, "crime", protocol, random_state=0)
    half = evaluate_embedding(city, embedding, "crime", protocol, random_state=0, train_fraction=0.5)
    assert np.array_equal(normal.fold, half.fold) and normal.region_ids.equals(half.region_ids)
    assert np.array_equal(normal.y, half.y) and np.isfinite(half.pred).all()
    folds = outer_splits(city, task_data(city, "crime"), protocol)
    assert half.n_train == [math.ceil(0.5 * len(train)) for train, _ in folds]
    assert not np.array_equal(normal.pred, half.pred)  # fewer labels: another fit
    again = evaluate_embedding(city, embedding, "crime", protocol, random_state=0, train_fraction=0.5)
    assert np.array_equal(half.pred, again.pred)


@pytest.mark.parametrize("protocol", ["nested", "spatial"])
def test_probe_and_inner_cv_see_only_the_kept_training_rows(
    city: CityData, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # Column 0 names the row, so the rows a probe is fit on can be read back from what it receives.
    td = task_data(city, "crime")
    frame = pd.DataFrame({"row": np.arange(city.n_regions, dtype=float)}, index=city.region_ids)
    frame["signal"] = city.views["poi_counts"].sum(axis=1).to_numpy(dtype=float)
    fitted: list[set[int]] = []
    inner_sizes: list[int] = []
    real_build, real_inner = protocols_module.build_head, probes.inner_splits

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        probe = real_build(*args, **kwargs)
        fit = probe.fit

        def recording_fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> Any:
            fitted.append({int(v) for v in X[:, 0]})
            return fit(X, y, groups=groups)

        probe.fit = recording_fit
        return probe

    def recording_inner(n: int, *args: Any, **kwargs: Any) -> Any:
        inner_sizes.append(n)
        return real_inner(n, *args, **kwargs)

    monkeypatch.setattr(protocols_module, "build_head", recording_build)
    monkeypatch.setattr(probes, "inner_splits", recording_inner)
    result = evaluate_embedding(city, frame, "crime", protocol, random_state=1, train_fraction=0.25)
    position = pd.Series(np.arange(city.n_regions), index=city.region_ids)
    folds = outer_splits(city, td, protocol)
    assert len(fitted) == len(folds) == len(inner_sizes)
    for k, (rows, n_inner, n_kept, (train, test)) in enumerate(
            zip(fitted, inner_sizes, result.n_train, folds, strict=True)):
        kept = subsample_train(train, 0.25, 1, k)
        expected = set(position.loc[td.region_ids[kept]].tolist())
        held_out = set(position.loc[td.region_ids[test]].tolist())
        dropped = set(position.loc[td.region_ids[np.setdiff1d(train, kept)]].tolist())
        assert rows == expected and len(rows) == n_kept == n_inner
        assert not rows & held_out and not rows & dropped


@pytest.mark.parametrize("fraction", [0.0, -0.25, 1.01, float("nan"), float("inf")])
def test_fraction_out_of_range_is_an_error(city: CityData, embedding: pd.DataFrame, fraction: float) -> None:
    with pytest.raises(UrbanProfileError, match=r"train fraction must be in \(0, 1\]"):
        evaluate_embedding(city, embedding, "crime", "nested", train_fraction=fraction)


def test_too_few_regions_for_the_inner_cv(city: CityData, embedding: pd.DataFrame) -> None:
    folds = outer_splits(city, task_data(city, "crime"), "nested")
    smallest = min(len(train) for train, _ in folds)
    too_small = (MIN_TRAIN_REGIONS - 1) / smallest
    with pytest.raises(UrbanProfileError, match=f"inner CV needs at least {MIN_TRAIN_REGIONS}") as caught:
        evaluate_embedding(city, embedding, "crime", "nested", train_fraction=too_small)
    assert "\n" not in str(caught.value) and city.name in str(caught.value)
    enough = MIN_TRAIN_REGIONS / min(len(train) for train, _ in folds) + 1e-9
    assert evaluate_embedding(city, embedding, "crime", "nested", train_fraction=enough).n_train[0] >= 5


def test_runner_rows_record_the_share_and_refuse_a_store(city: CityData, tmp_path: Path) -> None:
    plan = BenchmarkPlan(datasets=[city.name], methods=["raw-poi"], tasks=["crime"], protocols=["nested"],
                         seeds=[0, 1], train_fraction=0.5)
    outcome = run_benchmark(plan, cities={city.name: city}, progress=False)
    rows = outcome.rows
    assert len(rows) == 2  # a deterministic method runs every seed: the subset is drawn with the seed
    folds = outer_splits(city, task_data(city, "crime"), "nested")
    expected = [math.ceil(0.5 * len(train)) for train, _ in folds]
    assert all(r["train_fraction"] == 0.5 and r["n_train"] == expected for r in rows)
    assert rows[0]["r2"] != rows[1]["r2"]
    from urbanprofile.benchmark.store import open_store

    with open_store(tmp_path / "s.duckdb") as store, pytest.raises(UrbanProfileError, match="not kept in the"):
        run_benchmark(plan, cities={city.name: city}, store=store, progress=False)


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, data_dir: Path,
            *args: str) -> tuple[int, str, str]:
    """The CLI in this process (a subprocess pays the imports again); (exit code, stdout, stderr)."""
    monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    return run_in_process(monkeypatch, capsys, *args)


def one_error_line(result: tuple[int, str, str]) -> str:
    code, _, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_cli_train_fraction(make_data_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_data_dir(n=30)
    base = ["evaluate", "hafusion-testcity", "--method", "raw-poi", "--task", "crime", "--seeds", "0"]
    assert "(0, 1]" in one_error_line(run_cli(capsys, monkeypatch, root, *base, "--train-fraction", "0"))
    line = one_error_line(run_cli(capsys, monkeypatch, root, *base, "--train-fraction", "0.1"))
    assert "hafusion-testcity crime nested" in line and "inner CV needs at least" in line
    store = tmp_path / "s.duckdb"
    assert "--store" in one_error_line(run_cli(capsys, monkeypatch, root, *base, "--train-fraction", "0.5",
                                               "--store", str(store)))
    assert not store.exists()  # refused before anything was written
    code, stdout, stderr = run_cli(capsys, monkeypatch, root, *base, "--train-fraction", "0.5", "--json")
    assert code == 0, stderr
    [row] = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert row["train_fraction"] == 0.5 and all(n == math.ceil(0.5 * 27) for n in row["n_train"])


def test_joint_folds_take_the_share_too(city: CityData, embedding: pd.DataFrame) -> None:
    from urbanprofile.evaluation.protocols import evaluate_tasks

    normal = evaluate_tasks(city, embedding, ["crime", "checkin"], "nested", head="ridge", random_state=2)
    full = evaluate_tasks(city, embedding, ["crime", "checkin"], "nested", head="ridge", random_state=2,
                          train_fraction=1.0)
    half = evaluate_tasks(city, embedding, ["crime", "checkin"], "nested", head="ridge", random_state=2,
                          train_fraction=0.5)
    for a, b, c in zip(normal, full, half, strict=True):
        assert np.array_equal(a.pred, b.pred) and np.array_equal(a.fold, c.fold)
        assert c.train_fraction == 0.5 and sum(c.n_train) < sum(a.n_train) and np.isfinite(c.pred).all()
