"""The distributed build (Dask, local two-process cluster) writes exactly the single-machine dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_raw_city
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.data import load_dataset
from urbanprofile.data.build import BuildSpec, build_dataset, h3_regions, read_boundary
from urbanprofile.data.build.distributed import (
    BlockRouter,
    ClusterSpec,
    DaskJoiner,
    build_dataset_distributed,
    cluster_options,
    partition_regions,
)
from urbanprofile.errors import UrbanProfileError

distributed = pytest.importorskip("distributed")
pytest.importorskip("h3")

BOX = "0,0,0.06,0.05"  # the raw city's extent


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy city plus what tests the partition borders: POIs on region corners, block edges and H3 cell
    vertices (shared by regions of two partitions: the first region in order must win, as on one machine), and
    labels as points."""
    folder = tmp_path_factory.mktemp("raw")
    files = write_raw_city(folder, n_pois=900, n_trips=400)
    pois = pd.read_csv(files["pois"])
    corners = [(x / 100, y / 100) for x in range(7) for y in range(6)]
    edges = [(0.02, 0.013), (0.04, 0.031), (0.0333, 0.025), (0.02, 0.025)]
    import h3

    # Vertices of H3 cells, shared by three cells (of different partitions where parents meet).
    cells = {h3.latlng_to_cell(lat, lon, 9) for lon, lat in [(0.004, 0.004), (0.031, 0.026), (0.052, 0.041)]}
    vertices = [(lng, lat) for cell in sorted(cells) for lat, lng in h3.cell_to_boundary(cell)]
    extra = pd.DataFrame([(x, y, "food") for x, y in corners + edges + vertices], columns=["lon", "lat", "category"])
    pd.concat([pois, extra]).to_csv(files["pois"], index=False)
    rng = np.random.default_rng(3)
    points = pd.DataFrame({"lon": rng.uniform(0, 0.06, 200), "lat": rng.uniform(0, 0.05, 200),
                           "income": rng.normal(50, 10, 200).round(2)})
    points.to_csv(folder / "label_points.csv", index=False)
    return {**files, "label_points": folder / "label_points.csv"}


def _polygon_spec(raw: dict[str, Path]) -> BuildSpec:
    return BuildSpec(city="toy", regions=raw["regions"], region_name_column="name", pois=raw["pois"],
                     categories=["food", "shop", "school"], landuse=raw["landuse"], trips=raw["trips"],
                     labels=raw["labels"])


def _h3_spec(raw: dict[str, Path]) -> BuildSpec:
    return BuildSpec(city="toyh3", boundary=BOX, h3_resolution=9, pois=raw["pois"], landuse=raw["landuse"],
                     trips=raw["trips"], trip_time_column="time", labels=raw["label_points"])


def _assert_same_dataset(single: Path, spread: Path, commands_differ: bool = False) -> None:
    """Every file byte for byte, the loaded city value for value, the manifest entry for entry but the timings
    (and the command line, when two commands built them)."""
    files = sorted(p.name for p in single.iterdir())
    assert files == sorted(p.name for p in spread.iterdir())
    for name in files:
        if name != "manifest.json":
            assert (single / name).read_bytes() == (spread / name).read_bytes(), name
    a, b = load_dataset(single), load_dataset(spread)
    assert a.region_ids.equals(b.region_ids)
    assert a.regions.geometry.geom_equals_exact(b.regions.geometry, tolerance=0).all()
    assert sorted(a.views) == sorted(b.views)
    for view in a.views:
        pd.testing.assert_frame_equal(a.views[view], b.views[view], check_exact=True)
    pd.testing.assert_frame_equal(a.targets, b.targets, check_exact=True)
    ma, mb = (json.loads((folder / "manifest.json").read_text()) for folder in (single, spread))
    for manifest in (ma, mb):  # when and how long: the only differences
        manifest.pop("created")
        manifest["report"].pop("seconds")
        manifest["report"].pop("output")
        if commands_differ:
            manifest.pop("build_command")
    assert ma == mb


@pytest.mark.parametrize("kind, parts, engine, read", [
    ("polygon", 6, "auto", "memory"), ("polygon", 1, "auto", "memory"), ("h3", 5, "auto", "memory"),
    # POIs and trips read on the client in chunks, each chunk joined on the workers.
    ("polygon", 4, "auto", "streaming"), ("h3", 3, "auto", "streaming"),
    pytest.param("polygon", 3, "duckdb", "memory", marks=pytest.mark.scale),  # DuckDB loads its extension per task
])
def test_distributed_build_equals_single_machine(raw: dict[str, Path], client: object, tmp_path: Path,
                                                 kind: str, parts: int, engine: str, read: str) -> None:
    spec = _polygon_spec(raw) if kind == "polygon" else _h3_spec(raw)
    spec.join_engine = engine
    spec.build_engine = read
    spec.chunk_rows = 128  # several chunks of the 900 POIs and 400 trips
    single = build_dataset(spec, tmp_path / "single")
    lines: list[str] = []
    spread = build_dataset_distributed(spec, tmp_path / "spread", ClusterSpec(parts=parts), client=client,
                                       log=lines.append)
    _assert_same_dataset(tmp_path / "single", tmp_path / "spread")
    assert spread.n_pois_joined == single.n_pois_joined and spread.n_trips_kept == single.n_trips_kept
    assert any("partitions" in line for line in lines)
    assert single.n_pois_joined > 0 and single.n_trips_kept > 0
    assert single.read_engines == spread.read_engines == {"pois": read, "trips": read}


def test_streamed_chunks_are_joined_on_the_workers(raw: dict[str, Path], client: object, tmp_path: Path) -> None:
    """A streamed build reads its chunks on the client and routes every chunk's points to the workers."""
    spec = _polygon_spec(raw)
    spec.build_engine, spec.chunk_rows = "streaming", 300
    joiner = DaskJoiner(client, parts=4)
    report = build_dataset(spec, tmp_path / "spread", joiner=joiner)
    located = report.n_pois_read - report.n_pois_missing_location - report.n_pois_unreadable
    assert joiner.figures.points_routed == located + 2 * (report.n_trips_read - report.n_trips_missing
                                                          - report.n_trips_unreadable - report.n_trips_malformed)
    assert joiner.figures.partitions == 4 and joiner.figures.tasks > 0


def test_partitions_cover_every_region_once(raw: dict[str, Path]) -> None:
    regions = h3_regions(read_boundary(BOX), 9)
    plan = partition_regions(regions, 5, h3_resolution=9)
    owned = np.concatenate(plan.own)
    assert sorted(owned.tolist()) == list(range(len(regions)))  # each region owned exactly once
    assert plan.n == 5 and plan.parent_resolution is not None and plan.parent_resolution < 9
    for own, halo in zip(plan.own, plan.halo, strict=True):
        assert set(own.tolist()) <= set(halo.tolist()) and (np.diff(halo) > 0).all()
    # Points lying in a region are routed to a partition whose halo holds that region.
    rng = np.random.default_rng(0)
    lon, lat = rng.uniform(0, 0.06, 2000), rng.uniform(0, 0.05, 2000)
    from urbanprofile.data.build import assign_points

    position = assign_points(lon, lat, regions)
    part = plan.router.route(lon, lat)
    inside = position >= 0
    assert (part[inside] >= 0).all()
    assert all(position[i] in set(plan.halo[part[i]].tolist()) for i in np.flatnonzero(inside))


def test_block_router_edges() -> None:
    router = BlockRouter(0.0, 0.0, 1.0, 1.0, 2, 2)
    part = router.route(np.array([0.0, 1.0, 0.5, 1.0000001, np.nan]), np.array([0.0, 1.0, 0.2, 0.5, 0.5]))
    assert part.tolist() == [0, 3, 1, -1, -1]


class _KillOnce(distributed.WorkerPlugin):
    """A worker plugin that kills its worker process the first time a POI-count task starts (marker file)."""

    name = "kill-once"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if finish == "executing" and "_count_part" in str(key) and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os._exit(1)


@pytest.mark.scale
def test_lost_worker_is_retried(raw: dict[str, Path], tmp_path: Path) -> None:
    """A worker that dies mid-build has its partitions rerun elsewhere; the dataset is still the single one."""
    import sys

    import cloudpickle

    spec = _polygon_spec(raw)
    build_dataset(spec, tmp_path / "single")
    marker = tmp_path / "killed"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers do not have the tests on their path
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as fresh:
        fresh.register_plugin(_KillOnce(str(marker)))
        build_dataset_distributed(spec, tmp_path / "spread", ClusterSpec(parts=4), client=fresh)
    assert marker.exists()  # a worker did die
    _assert_same_dataset(tmp_path / "single", tmp_path / "spread")


def test_cluster_options() -> None:
    assert cluster_options(None, None, None) is None
    assert cluster_options(3, None, None) == ClusterSpec(workers=3, parts=16)
    for bad, fragment in [((None, None, 8), "--parts needs --workers"), ((0, None, None), "--workers must be"),
                          ((2, None, 0), "--parts must be"), ((2, "tcp://h:8786", None), "not both")]:
        with pytest.raises(UrbanProfileError, match=fragment):
            cluster_options(*bad)


def test_cli_options_refused_before_any_work(raw: dict[str, Path], tmp_path: Path) -> None:
    base = ["build", "toy", "--regions", str(raw["regions"]), "--pois", str(raw["pois"])]
    assert_user_error(run_cli(*base, "--out", str(tmp_path / "x"), "--parts", "4"), "--parts needs --workers")
    assert not (tmp_path / "x").exists()


@pytest.mark.scale
def test_cli_distributed_build(raw: dict[str, Path], tmp_path: Path) -> None:
    spec = BuildSpec(city="toy", regions=raw["regions"], pois=raw["pois"], categories=["food", "shop", "school"],
                     landuse=raw["landuse"])
    build_dataset(spec, tmp_path / "single")
    base = ["build", "toy", "--regions", str(raw["regions"]), "--pois", str(raw["pois"]), "--categories",
            "food,shop,school", "--landuse", str(raw["landuse"])]
    result = run_cli(*base, "--out", str(tmp_path / "spread"), "--workers", "2", "--parts", "4")
    assert result.returncode == 0, result.stderr
    assert "distributed build: 30 regions" in result.stderr
    _assert_same_dataset(tmp_path / "single", tmp_path / "spread", commands_differ=True)
    assert_user_error(run_cli(*base, "--out", str(tmp_path / "y"), "--scheduler", "tcp://127.0.0.1:9"),
                      "--scheduler tcp://127.0.0.1:9: no Dask scheduler answers there")
    assert not (tmp_path / "y").exists()
