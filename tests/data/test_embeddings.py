"""Bring your own embedding: a file or DataFrame goes through the same protocols and store as a built-in method."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile import methods
from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data import CityData
from urbanprofile.data.embeddings import DATASET_ATTR, check_embedding, read_embedding_file
from urbanprofile.errors import DataError
from urbanprofile.methods import get_method, list_methods, register_embedding

PLAN = {"tasks": ["crime"], "protocols": ["nested"], "seeds": [0]}


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Leave the method registry as it was: embeddings registered here must not reach other tests."""
    saved = dict(methods._REGISTRY)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(saved)


def _pca_frame(city: CityData) -> pd.DataFrame:
    return get_method("pca").build(random_state=0).fit_transform(city)


def test_frame_scores_like_the_builtin_method(city: CityData) -> None:
    spec = register_embedding("mine", _pca_frame(city).iloc[::-1])  # row order must not matter
    cities = {city.name: city}
    ours = run_benchmark(BenchmarkPlan(datasets=[city.name], methods=[spec.name], **PLAN), cities=cities,
                         progress=False).rows
    builtin = run_benchmark(BenchmarkPlan(datasets=[city.name], methods=["pca"], **PLAN), cities=cities,
                            progress=False).rows
    assert [r["method"] for r in ours] == ["file:mine"]
    assert "file:mine" not in list_methods() and "file:mine" in list_methods(external=True)
    assert ours[0]["status"] == "ok"
    assert ours[0]["r2"] == pytest.approx(builtin[0]["r2"])
    assert ours[0]["worst_block_r2"] == pytest.approx(builtin[0]["worst_block_r2"])


def test_changed_content_is_a_new_result_and_same_content_resumes(city: CityData, tmp_path: Path) -> None:
    frame = _pca_frame(city)
    path = tmp_path / "emb.parquet"
    frame.to_parquet(path)
    cities = {city.name: city}
    with ResultStore(tmp_path / "store.duckdb") as store:
        first = register_embedding("e", path)
        run_benchmark(BenchmarkPlan(datasets=[city.name], methods=["file:e"], **PLAN), store=store, cities=cities,
                      progress=False)
        moved = tmp_path / "moved.parquet"
        path.rename(moved)  # same content elsewhere: the same result
        assert register_embedding("e", moved).config_hash == first.config_hash
        again = run_benchmark(BenchmarkPlan(datasets=[city.name], methods=["file:e"], **PLAN), store=store,
                              cities=cities, progress=False)
        assert again.n_resumed == 1 and not again.rows
        changed = frame.copy()
        changed.iloc[:, 0] *= 2.0
        changed.to_parquet(moved)
        second = register_embedding("e", moved)
        assert second.config_hash != first.config_hash
        fresh = run_benchmark(BenchmarkPlan(datasets=[city.name], methods=["file:e"], **PLAN), store=store,
                              cities=cities, progress=False)
        assert fresh.n_resumed == 0 and len(fresh.rows) == 1


def test_file_changed_after_registration_is_refused(city: CityData, tmp_path: Path) -> None:
    path = tmp_path / "emb.csv"
    _pca_frame(city).to_csv(path)
    spec = register_embedding("late", path)
    _pca_frame(city).mul(3.0).to_csv(path)
    with pytest.raises(DataError, match="changed since it was registered"):
        spec.build().fit(city)


def _broken(city: CityData, case: str) -> tuple[pd.DataFrame, str]:
    frame = _pca_frame(city).iloc[:, :4].copy()
    ids = list(city.region_ids)
    if case == "missing":
        return frame.drop(index=ids[5]), f"region {str(ids[5])!r}"
    if case == "extra":
        extra = frame.iloc[[0]].rename(index={ids[0]: "nowhere"})
        return pd.concat([frame, extra]), "'nowhere'"
    if case == "duplicated":
        return pd.concat([frame, frame.iloc[[7]]]), f"{str(ids[7])!r} appears more than once"
    if case == "non-numeric":
        frame["emb_2"] = frame["emb_2"].map(lambda v: f"{v:.2f}")
        return frame, "'emb_2' is not numeric"
    if case == "nan":
        frame.iloc[9, 1] = np.nan
        return frame, f"'emb_1' holds NaN (region {str(ids[9])!r}"
    if case == "other-dataset":
        frame.attrs[DATASET_ATTR] = "hafusion-chicago"
        return frame, "an embedding of 'hafusion-chicago'"
    if case == "no-id-matches":
        return frame.set_axis([f"x{i}" for i in range(len(frame))]), "no region id matches"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "extra", "duplicated", "non-numeric", "nan", "other-dataset",
                                  "no-id-matches"])
def test_bad_embedding_names_the_first_offender(city: CityData, case: str) -> None:
    frame, fragment = _broken(city, case)
    with pytest.raises(DataError) as caught:
        check_embedding(frame, city, "emb.csv")
    message = str(caught.value)
    assert message.startswith("emb.csv: ") and fragment in message and "\n" not in message


def test_bad_embedding_fails_the_plan_before_any_row(city: CityData) -> None:
    frame, _ = _broken(city, "nan")
    spec = register_embedding("bad", frame)
    with pytest.raises(DataError, match="holds NaN"):
        run_benchmark(BenchmarkPlan(datasets=[city.name], methods=[spec.name], **PLAN), cities={city.name: city},
                      progress=False)


def test_csv_with_ids_as_numbers_matches_and_needs_region_id(city: CityData, tmp_path: Path) -> None:
    path = tmp_path / "emb.csv"
    _pca_frame(city).reset_index().to_csv(path, index=False)
    frame = read_embedding_file(path)
    assert check_embedding(frame, city, str(path)).index.equals(city.region_ids)
    pd.DataFrame({"id": [1], "a": [0.5]}).to_csv(tmp_path / "noid.csv", index=False)
    with pytest.raises(DataError, match="no 'region_id' column"):
        read_embedding_file(tmp_path / "noid.csv")


def test_cli_evaluate_and_benchmark_with_files(make_data_dir: Callable[..., Path], tmp_path: Path) -> None:
    data_dir = make_data_dir()
    emb = tmp_path / "mine.parquet"
    made = run_cli("embed", "hafusion-testcity", "--method", "pca", "--out", str(emb), data_dir=data_dir)
    assert made.returncode == 0, made.stderr
    result = run_cli("benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--embeddings",
                     f"mine={emb}", "--tasks", "crime", "--protocols", "nested", "--seeds", "0", "--json",
                     "--store", str(tmp_path / "s.duckdb"), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["method"] for r in rows) == ["file:mine", "raw-poi"]
    assert all(r["status"] == "ok" and r["r2"] is not None for r in rows)

    frame = pd.read_parquet(emb)
    frame.iloc[3, 0] = np.nan
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad)
    assert_user_error(run_cli("evaluate", "hafusion-testcity", "--embedding", str(bad), "--task", "crime",
                              data_dir=data_dir), str(bad), "holds NaN", "region '3'")
