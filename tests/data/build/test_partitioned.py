"""The partitioned H3 build: the streamed build's dataset, with no polygon per cell held; guards and faults."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error, run_cli

import urbanprofile.data.build.partitioned as partitioned
from urbanprofile.data.build import BuildSpec, build_dataset
from urbanprofile.data.build.h3_fast import cell_boundaries
from urbanprofile.data.build.join import RegionJoiner
from urbanprofile.data.build.partitioned import H3Assigner, cover_partitions, use_partitioned
from urbanprofile.data.build.regions import h3_regions, read_boundary
from urbanprofile.data.loaders.built import load_built
from urbanprofile.errors import DataError

#: About 4,000 resolution-10 cells: above the size where OD views turn sparse, so both trip writers are used.
BOX = "7.0,45.0,7.12,45.06"
FILES = ("regions", "poi_counts", "od_flows", "od_patterns")


def _border_points(cells: pd.Index, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell vertices and edge midpoints of ``n`` cells: points on shared borders, where the first region wins."""
    chosen = cells[rng.choice(len(cells), n, replace=False)]
    coords, counts = cell_boundaries(list(chosen))
    following = np.concatenate([np.roll(np.arange(c), -1) + s for s, c in zip(np.cumsum(counts) - counts, counts,
                                                                                  strict=True)])
    middle = (coords + coords[following]) / 2
    both = np.concatenate([coords, middle])
    return both[:, 0], both[:, 1]


def _inputs(folder: Path, box: str = BOX, resolution: int = 10, n: int = 6_000, seed: int = 0) -> dict[str, Any]:
    """Seeded POIs and timed trips over ``box``: inside, outside, on cell borders and vertices, one without a
    location."""
    rng = np.random.default_rng(seed)
    west, south, east, north = (float(v) for v in box.split(","))
    cells = h3_regions(read_boundary(box), resolution).index
    lon = rng.uniform(west - 0.01, east + 0.01, n)
    lat = rng.uniform(south - 0.01, north + 0.01, n)
    b_lon, b_lat = _border_points(cells, rng, 60)
    lon, lat = np.concatenate([lon, b_lon]), np.concatenate([lat, b_lat])
    category = rng.choice(["food", "shop", "school", "bar", "casino"], len(lon)).astype(object)
    pois = pd.DataFrame({"lon": lon, "lat": lat, "category": category})
    pois.loc[5, "lon"] = np.nan
    pois.to_parquet(folder / "pois.parquet", index=False)
    m = len(lon) // 2
    trips = pd.DataFrame({"o_lon": lon[:m], "o_lat": lat[:m], "d_lon": lon[m:2 * m][::-1], "d_lat": lat[m:2 * m][::-1],
                          "time": rng.uniform(0, 24, m)})
    trips.to_parquet(folder / "trips.parquet", index=False)
    return {"boundary": box, "h3_resolution": resolution, "pois": folder / "pois.parquet",
            "trips": folder / "trips.parquet", "max_cells": 50_000}


def _build(folder: Path, inputs: dict[str, Any], engine: str, **extra: Any) -> Path:
    out = folder / engine
    build_dataset(BuildSpec("box", build_engine=engine, **inputs, **extra), out, command="test")
    return out


def _assert_same_dataset(a: Path, b: Path) -> None:
    for name in FILES:
        left, right = pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet")
        pd.testing.assert_frame_equal(left, right, obj=name)  # geometry as WKB: the same vertices
    first, second = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert list(first) == list(second)
    for key in ("created", "build_spec", "report"):
        first.pop(key), second.pop(key)
    assert first == second
    x, y = load_built(a).validate(), load_built(b).validate()
    for view in x.views:
        pd.testing.assert_frame_equal(x.views[view], y.views[view], obj=view)


@pytest.mark.parametrize("write_cells", [partitioned.WRITE_CELLS, 700])
def test_same_dataset_as_the_streamed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_cells: int) -> None:
    monkeypatch.setattr(partitioned, "WRITE_CELLS", write_cells)  # 700: many blocks, row groups and spill files
    inputs = _inputs(tmp_path)
    _assert_same_dataset(_build(tmp_path, inputs, "streaming"), _build(tmp_path, inputs, "partitioned"))
    manifest = json.loads((tmp_path / "partitioned" / "manifest.json").read_text())
    assert manifest["regions"]["count"] > 3_000
    assert manifest["report"]["read_engines"] == {"pois": "partitioned", "trips": "partitioned"}
    assert not list(tmp_path.glob(".partitioned*")) and not (tmp_path / "partitioned" / ".spill").exists()


def test_small_city_patterns_in_view_order(tmp_path: Path) -> None:
    """A city of 3,000 regions or fewer has dense OD views; its pattern rows are written origin by origin."""
    inputs = _inputs(tmp_path, box="7.0,45.0,7.05,45.03", resolution=10, n=3_000)
    _assert_same_dataset(_build(tmp_path, inputs, "streaming"), _build(tmp_path, inputs, "partitioned"))


def test_points_go_where_the_polygon_index_puts_them(tmp_path: Path) -> None:
    regions = h3_regions(read_boundary(BOX), 10)
    cells = np.array([int(c, 16) for c in regions.index], dtype=np.uint64)
    rng = np.random.default_rng(1)
    lon, lat = _border_points(regions.index, rng, 200)
    lon = np.concatenate([lon, rng.uniform(6.98, 7.14, 2_000), [np.nan, 200.0, 7.05]])
    lat = np.concatenate([lat, rng.uniform(44.98, 45.08, 2_000), [45.02, 45.02, 95.0]])
    expected = RegionJoiner(regions, "geopandas", 10).assign(lon, lat)
    got = H3Assigner(cells, 10).assign(lon, lat)
    np.testing.assert_array_equal(got, expected)
    assert (got[:400] >= 0).all() and (got == -1).sum() > 100  # borders are inside; the margin is outside


def test_cut_by_parents_gives_todays_cells() -> None:
    boundary = read_boundary(BOX)
    shape = boundary.geometry.union_all()
    expected = h3_regions(boundary, 10)
    for steps in (1, 3):
        parts = list(cover_partitions(shape, 10, steps))
        cells = np.concatenate([c for c, _ in parts])
        assert list(expected.index) == [format(c, "x") for c in cells.tolist()]
        polygons = np.concatenate([p for _, p in parts])
        assert all(a.equals_exact(b, 0) for a, b in zip(expected.geometry[:50], polygons[:50], strict=True))


def test_auto_takes_it_for_large_h3_builds_it_can_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _inputs(tmp_path, n=500)
    spec = BuildSpec("box", **inputs)
    assert not use_partitioned(spec)  # about 4,000 cells: below the threshold
    monkeypatch.setattr(partitioned, "PARTITIONED_ABOVE_CELLS", 1_000)
    assert use_partitioned(spec)
    assert not use_partitioned(BuildSpec("box", build_engine="streaming", **inputs))
    assert not use_partitioned(BuildSpec("box", label_columns=["x"], **inputs))
    assert not use_partitioned(spec, joiner=object())


def test_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, n=500)
    pd.DataFrame({"origin": ["a"], "destination": ["b"]}).to_csv(tmp_path / "od.csv", index=False)
    with pytest.raises(DataError, match="--engine partitioned: it joins trips by their coordinates"):
        use_partitioned(BuildSpec("box", build_engine="partitioned", **{**inputs, "trips": tmp_path / "od.csv"}))
    with pytest.raises(DataError, match="antimeridian or a pole"):
        build_dataset(BuildSpec("box", build_engine="partitioned", **{**inputs, "boundary": "178.5,10,179.5,10.1"}),
                      tmp_path / "seam")
    assert not use_partitioned(BuildSpec("box", **{**inputs, "boundary": "-180,60,-170,89", "max_cells": 10**9}))
    assert not (tmp_path / "seam").exists() and not list(tmp_path.glob(".seam*"))
    with pytest.raises(DataError, match="not --h3-centres-only"):
        use_partitioned(BuildSpec("box", build_engine="partitioned", h3_cover=False, **inputs))


def test_cli_max_cells_and_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    inputs = _inputs(tmp_path, n=500)
    out = tmp_path / "out"
    args = ["build", "box", "--boundary", BOX, "--h3-res", "10", "--pois", str(inputs["pois"]), "--engine",
            "partitioned", "--out", str(out)]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--max-cells", "1000")
    assert_one_error(code, err, "H3 cells at resolution 10, more than --max-cells 1,000")
    # POIs with longitude and latitude swapped: refused after the cells were written into the building folder
    swapped = pd.read_parquet(inputs["pois"]).rename(columns={"lon": "lat", "lat": "lon"})
    swapped.to_parquet(tmp_path / "swapped.parquet", index=False)
    code, _, err = run_cli(monkeypatch, capsys, *args[:7], str(tmp_path / "swapped.parquet"), *args[8:])
    assert_one_error(code, err, "swapped.parquet", "coordinates look swapped")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert load_built(out).validate().meta["h3_resolution"] == 10


def test_without_h3ronpy_cells_come_from_h3(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    lon, lat = rng.uniform(6.9, 7.2, 5_000), rng.uniform(44.9, 45.1, 5_000)
    with_h3ronpy = partitioned.cells_of_points(lon, lat, 10)
    monkeypatch.setitem(sys.modules, "h3ronpy.vector", None)  # an import of it raises ImportError
    np.testing.assert_array_equal(partitioned.cells_of_points(lon, lat, 10), with_h3ronpy)
