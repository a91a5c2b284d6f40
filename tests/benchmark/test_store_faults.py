"""Faults of the results store and the runner: stale rows, dataset identity, foreign and hand-edited stores, a full
disk, bad seeds, NaN metrics, nothing to run. Each leaves the store as before or with only whole finished units."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error, whole_units
from helpers import run_cli_argv as cli

from urbanprofile.benchmark.runner import BenchmarkPlan, describe_recomputed, run_benchmark
from urbanprofile.benchmark.store import KEY, ResultStore
from urbanprofile.benchmark.versions import dataset_fingerprint
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import DataError, UrbanProfileError
from urbanprofile.methods import MethodSpec, get_method, register_method

PLAN = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "pca"], tasks=["crime"], protocols=["paper"],
                     seeds=[0])




def snapshot(path: Path) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return sorted(con.execute(f"SELECT {', '.join(KEY)}, r2, status FROM results").fetchall())
    finally:
        con.close()


@pytest.fixture
def hafusion_dir(tmp_path: Path) -> Path:
    from conftest import write_hafusion_city

    root = tmp_path / "data"
    write_hafusion_city(root, n=30)
    return root


# -- 1. stale results: the dataset's content is part of the reuse key --------------------------------------------
def test_fingerprint_follows_the_content(city: CityData) -> None:
    same = make_synthetic_city(n_regions=64, n_poi_categories=12, random_state=0)
    assert dataset_fingerprint(city) == dataset_fingerprint(same)
    relabelled = dataclasses.replace(city, targets=city.targets.assign(crime=city.targets["crime"] + 1))
    assert dataset_fingerprint(relabelled) != dataset_fingerprint(city)
    views = dict(city.views)
    views["poi_counts"] = views["poi_counts"].rename(columns=lambda c: f"x{c}")
    assert dataset_fingerprint(dataclasses.replace(city, views=views)) != dataset_fingerprint(city)


def test_relabelled_dataset_is_recomputed(hafusion_dir: Path, tmp_path: Path) -> None:
    plan = BenchmarkPlan(datasets=["hafusion-testcity"], methods=["raw-poi"], tasks=["crime"], protocols=["paper"],
                         seeds=[0])
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        first = run_benchmark(plan, hafusion_dir, store=store, progress=False)
        again = run_benchmark(plan, hafusion_dir, store=store, progress=False)
    assert len(first.rows) == 1 and again.rows == [] and again.n_resumed == 1
    crime = hafusion_dir / "hafusion" / "testcity" / "crime_counts.npy"
    labels = np.load(crime)
    np.save(crime, labels[::-1].copy())  # the same city with other labels (a rebuild)
    with ResultStore(path) as store:
        rebuilt = run_benchmark(plan, hafusion_dir, store=store, progress=False)
        stored = store.rows()
    assert rebuilt.n_resumed == 0 and len(rebuilt.rows) == 1
    assert len(stored) == 1 and stored[0]["r2"] == pytest.approx(rebuilt.rows[0]["r2"])
    assert stored[0]["r2"] != pytest.approx(first.rows[0]["r2"])
    assert stored[0]["dataset_fingerprint"] != first.rows[0]["dataset_fingerprint"]
    [line] = describe_recomputed(rebuilt)
    assert "raw-poi: 1 stored rows were computed on other data (hafusion-testcity changed" in line


# -- 2. one identity for a dataset given by path ------------------------------------------------------------------
class FailsOnceEmbedder:
    """Fails with a user-level error while a marker file exists (a diverged run), then works like raw-poi."""

    marker: Path | None = None

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        if self.marker is not None and self.marker.exists():
            raise UrbanProfileError("training diverged")
        return get_method("raw-poi").build(random_state=self.random_state).fit_transform(city)


def _build(folder: Path, raw: dict[str, Path], labels: Path) -> Path:
    from urbanprofile.data.build.pipeline import build_dataset
    from urbanprofile.data.build.spec import BuildSpec

    spec = BuildSpec(city="toy", regions=raw["regions"], pois=raw["pois"], categories=["food", "shop", "school"],
                     labels=labels)
    build_dataset(spec, folder, overwrite=folder.exists())
    return folder


def test_path_datasets_keep_apart_resume_and_replace_failed_rows(raw_city: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    other_labels = tmp_path / "labels2.csv"
    table = pd.read_csv(raw_city["labels"])
    table.assign(crime=table["crime"][::-1].to_numpy() * 3).to_csv(other_labels, index=False)
    first = _build(tmp_path / "a" / "toy", raw_city, raw_city["labels"])
    second = _build(tmp_path / "b" / "toy", raw_city, other_labels)  # the same city name, another folder
    monkeypatch.delenv("URBANPROFILE_DATA", raising=False)
    marker = tmp_path / "diverge"
    marker.touch()
    monkeypatch.setattr(FailsOnceEmbedder, "marker", marker)
    spec = register_method(MethodSpec("fails-once", f"{__name__}:FailsOnceEmbedder"), replace=True)
    plan = BenchmarkPlan(datasets=[str(first), str(second)], methods=["raw-poi", spec.name], tasks=["crime"],
                         protocols=["paper"], seeds=[0])
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        run1 = run_benchmark(plan, store=store, progress=False)
        assert {r["dataset"] for r in run1.rows} == {str(first.resolve()), str(second.resolve())}
        assert len(run1.failed) == 2 and len(store.rows()) == 4
        marker.unlink()
        run2 = run_benchmark(plan, store=store, progress=False)
        assert run2.n_resumed == 2 and len(run2.rows) == 2 and not run2.failed  # resumed by path
        run3 = run_benchmark(BenchmarkPlan(**{**dataclasses.asdict(plan), "datasets": [
            str(tmp_path / "a" / ".." / "a" / "toy"), str(second)]}), store=store, progress=False)
        assert run3.rows == [] and run3.n_resumed == 4  # another path to the same folder is the same dataset
        rows = store.rows()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    r2 = {r["dataset"]: r["r2"] for r in rows if r["method"] == "raw-poi"}
    assert r2[str(first.resolve())] != pytest.approx(r2[str(second.resolve())])  # neither replaced the other
    from urbanprofile.report.html import render_report

    page, _, _ = render_report(rows, str(path), with_maps=False)
    assert "Failed units" not in page


def test_rebuilt_dataset_is_recomputed_and_reported(raw_city: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The case as a user meets it: build, benchmark, rebuild with new labels (--overwrite), benchmark, report."""
    from urbanprofile.benchmark.runner import format_mean_std
    from urbanprofile.report.html import render_report

    monkeypatch.delenv("URBANPROFILE_DATA", raising=False)
    folder = _build(tmp_path / "toy", raw_city, raw_city["labels"])
    plan = BenchmarkPlan(datasets=[str(folder)], methods=["raw-poi"], tasks=["crime"], protocols=["paper"], seeds=[0])
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        before = run_benchmark(plan, store=store, progress=False).rows[0]["r2"]
    table = pd.read_csv(raw_city["labels"])
    new_labels = tmp_path / "labels_new.csv"
    table.assign(crime=np.arange(len(table), dtype=float) ** 2).to_csv(new_labels, index=False)
    _build(folder, raw_city, new_labels)
    with ResultStore(path) as store:
        after = run_benchmark(plan, store=store, progress=False)
        rows = store.rows()
    assert after.n_resumed == 0 and len(after.rows) == 1 and len(rows) == 1
    new = after.rows[0]["r2"]
    assert format_mean_std(new, 0.0) != format_mean_std(before, 0.0)
    page, _, _ = render_report(rows, str(path), with_maps=False)
    assert format_mean_std(new, 0.0) in page and format_mean_std(before, 0.0) not in page


# -- 4. a foreign database is refused; an empty file is fine -------------------------------------------------------
def test_foreign_duckdb_is_refused_and_left_alone(hafusion_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    foreign = tmp_path / "crm.duckdb"
    con = duckdb.connect(str(foreign))
    con.execute("CREATE TABLE customers (id INTEGER, name VARCHAR)")
    con.execute("INSERT INTO customers VALUES (1, 'Ada')")
    con.close()
    before = foreign.read_bytes()
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--tasks", "crime",
                           "--protocols", "paper", "--store", str(foreign)], capsys, monkeypatch, hafusion_dir)
    assert_one_error(code, stderr, str(foreign), "not an urbanprofile results store", "customers")
    assert foreign.read_bytes() == before
    empty = tmp_path / "new.duckdb"
    empty.touch()
    with ResultStore(empty) as store:
        assert store.is_empty()


# -- 5 and 12. a full disk: the real cause, and only whole finished units --------------------------------------
class FullDisk:
    """A connection whose COMMITs after the first ``ok`` ones fail like DuckDB on a full disk: the transaction is
    gone, then the error is raised (so a later ROLLBACK finds no transaction)."""

    def __init__(self, con: Any, ok: int, error: BaseException) -> None:
        self._con, self.ok, self.error = con, ok, error

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            if self.ok <= 0:
                self._con.execute("ROLLBACK")
                raise self.error
            self.ok -= 1
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


@pytest.mark.parametrize("error", [duckdb.IOException("IO Error: Could not write file \"r.duckdb.wal\": No space "
                                                      "left on device"),
                                   OSError(errno.ENOSPC, "No space left on device")], ids=["duckdb", "oserror"])
def test_full_disk_keeps_whole_units_and_says_why(city: CityData, tmp_path: Path, error: BaseException) -> None:
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "pca", "raw-landuse"], tasks=["crime"],
                         protocols=["paper", "nested"], seeds=[0])
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        run_benchmark(dataclasses.replace(plan, methods=["raw-poi"]), store=store, progress=False,
                      cities={"synthetic": city})
    before = snapshot(path)
    with ResultStore(path) as store:
        store._con = FullDisk(store._con, ok=1, error=error)  # the second new unit hits the full disk
        with pytest.raises(DataError) as raised:
            run_benchmark(plan, store=store, progress=False, cities={"synthetic": city})
    message = str(raised.value)
    assert "No space left on device" in message and str(path) in message and "no transaction" not in message
    after = snapshot(path)
    assert set(before) < set(after) and len(after) == len(before) + 2  # one more whole unit, nothing else
    with ResultStore(path) as store:
        whole_units(store.rows(), cells_per_unit=2)


def test_full_disk_in_the_cli_is_one_line(hafusion_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from urbanprofile.benchmark import store as store_module

    opened = store_module.ResultStore.__init__

    def full_disk(self: ResultStore, *args: Any, **kwargs: Any) -> None:
        opened(self, *args, **kwargs)
        self._con = FullDisk(self._con, ok=0, error=OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(store_module.ResultStore, "__init__", full_disk)
    path = tmp_path / "r.duckdb"
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--tasks", "crime",
                           "--protocols", "paper", "--store", str(path)], capsys, monkeypatch, hafusion_dir)
    assert_one_error(code, stderr, str(path), "No space left on device")
    assert not path.exists()  # the store this command created held nothing: it is gone again


# -- 6. seeds ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds", ["99999999999", "-1", "1,,2", "0,x", ""])
def test_bad_seeds_are_one_line_and_leave_no_store(seeds: str, hafusion_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.duckdb"
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--seeds", seeds,
                           "--store", str(path)], capsys, monkeypatch, hafusion_dir)
    assert_one_error(code, stderr, "--seeds")
    assert not path.exists()


def test_seed_range_is_checked_by_the_library(city: CityData) -> None:
    for seeds in ([2**31], [-3]):
        with pytest.raises(UrbanProfileError, match="out of range"):
            run_benchmark(dataclasses.replace(PLAN, seeds=seeds), progress=False, cities={"synthetic": city})


def test_a_user_error_after_the_store_opened_leaves_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import write_hafusion_city

    folder = write_hafusion_city(tmp_path / "data", n=30)
    np.save(folder / "poi_dist.npy", np.load(folder / "poi_dist.npy")[:-2])  # rows disagree with the regions
    path = tmp_path / "r.duckdb"
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--store",
                           str(path)], capsys, monkeypatch, tmp_path / "data")
    assert_one_error(code, stderr)
    assert not path.exists()


# -- 7. a hand-edited store ---------------------------------------------------------------------------------------
@pytest.fixture
def small_store(city: CityData, tmp_path: Path) -> Path:
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        run_benchmark(PLAN, store=store, progress=False, cities={"synthetic": city})
    return path


def _edit(path: Path, sql: str) -> None:
    con = duckdb.connect(str(path))
    con.execute(sql)
    con.close()


def test_hand_edited_version_is_one_line(small_store: Path) -> None:
    _edit(small_store, "UPDATE store_info SET value = 'three' WHERE key = 'schema_version'")
    for read_only in (False, True):
        with pytest.raises(DataError, match=r"r.duckdb: store_info schema_version is 'three', not a whole number"):
            ResultStore(small_store, read_only=read_only)


@pytest.mark.parametrize(("sql", "fragments"), [
    ("UPDATE results SET protocol = 'leaky' WHERE method = 'pca'", ["unknown protocol 'leaky'", "method='pca'"]),
    ("UPDATE results SET block_r2 = '{\"0\": 0.5,' WHERE method = 'pca'", ["column block_r2 is not valid JSON",
                                                                            "method='pca'"]),
    ("UPDATE results SET block_mae = '[1, 2]' WHERE method = 'raw-poi'", ["column block_mae holds a JSON list",
                                                                      "method='raw-poi'"]),
    ("UPDATE results SET status = 'maybe' WHERE method = 'pca'", ["unknown status 'maybe'"]),
], ids=["protocol", "json", "json-type", "status"])
def test_hand_edited_rows_are_one_line_in_report(small_store: Path, sql: str, fragments: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _edit(small_store, sql)
    out = tmp_path / "report"
    code, _, stderr = cli(["report", "--store", str(small_store), "--out", str(out), "--no-maps"], capsys,
                          monkeypatch)
    assert_one_error(code, stderr, str(small_store), *fragments)
    assert not (out / "index.html").exists()


# -- 9. NaN metrics ---------------------------------------------------------------------------------------------
def test_overflowing_values_give_failed_rows_with_a_reason(city: CityData, recwarn: pytest.WarningsRecorder) -> None:
    huge = dataclasses.replace(city, targets=city.targets.assign(crime=city.targets["crime"] * 1e300))
    outcome = run_benchmark(dataclasses.replace(PLAN, methods=["raw-poi"], protocols=["paper", "nested"]),
                            progress=False, cities={"synthetic": huge})
    assert len(outcome.rows) == 2 and len(outcome.failed) == 2
    for row in outcome.failed:
        assert row["error"].startswith("non-finite metrics (") and "numeric warnings, first:" in row["error"]
        assert row.get("r2") is None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # summarised in the reason


# -- 10. nothing to run, and a store of failed rows only -----------------------------------------------------------
def test_benchmark_with_nothing_to_run_exits_2(hafusion_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.duckdb"
    code, _, stderr = cli(["benchmark", "--datasets", "hafusion-testcity", "--methods", "raw-poi", "--tasks",
                           "carbon", "--protocols", "paper", "--store", str(path)], capsys, monkeypatch, hafusion_dir)
    assert_one_error(code, stderr, "nothing in the plan can run", "no task 'carbon'")
    assert not path.exists()


def test_report_of_failed_rows_shows_them(city: CityData, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "diverge"
    marker.touch()
    monkeypatch.setattr(FailsOnceEmbedder, "marker", marker)
    spec = register_method(MethodSpec("fails-once", f"{__name__}:FailsOnceEmbedder"), replace=True)
    path = tmp_path / "r.duckdb"
    with ResultStore(path) as store:
        run_benchmark(dataclasses.replace(PLAN, methods=[spec.name]), store=store, progress=False,
                      cities={"synthetic": city})
    code, _, stderr = cli(["report", "--store", str(path), "--out", str(tmp_path / "rep"), "--no-maps"], capsys,
                          monkeypatch)
    assert code == 0, stderr
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "Failed units (1 rows)" in page and "training diverged" in page and "fails-once" in page


# -- 11. progress by units in a log -------------------------------------------------------------------------------
def test_progress_writes_a_line_per_unit_to_a_log(city: CityData, capsys: pytest.CaptureFixture[str]) -> None:
    plan = dataclasses.replace(PLAN, methods=["raw-poi", "pca", "raw-landuse"])
    run_benchmark(plan, progress=True, cities={"synthetic": city})
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unit ")]
    assert [line.split(" done:")[0] for line in lines] == ["unit 1/3", "unit 2/3", "unit 3/3"]
    assert all("elapsed, about" in line and "left" in line for line in lines)


class TrainedEmbedder:
    """Reports three epochs, then embeds like raw-poi."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state
        self.on_epoch: Callable[[int, int], None] | None = None

    def fit_transform(self, city: CityData) -> pd.DataFrame:
        for epoch in range(3):
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, 3)
        return get_method("raw-poi").build().fit_transform(city)


def test_epochs_reach_the_progress(city: CityData) -> None:
    from urbanprofile.benchmark.unit import Unit, run_unit

    spec = register_method(MethodSpec("trained", f"{__name__}:TrainedEmbedder"), replace=True)
    seen: list[tuple[str, int, int]] = []
    unit = Unit("synthetic", spec, 0, (("crime", "paper", "ridge"),))
    rows, _ = run_unit(unit, city, on_epoch=lambda u, e, t: seen.append((u.label, e, t)))
    assert [r["status"] for r in rows] == ["ok"]
    assert seen == [("synthetic trained seed 0", 1, 3), ("synthetic trained seed 0", 2, 3),
                    ("synthetic trained seed 0", 3, 3)]
