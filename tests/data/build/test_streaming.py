"""Streamed builds (issue 22): POI files read in chunks give exactly the in-memory dataset; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error, run_cli

from urbanprofile.data.build.join import RegionJoiner, assign_points
from urbanprofile.data.build.pipeline import build_city
from urbanprofile.data.build.regions import h3_regions, read_boundary
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.data.build.streaming import choose_engine, point_chunks
from urbanprofile.data.city import is_sparse_view, view_csr

BOX = "0,0,0.06,0.05"
#: Report figures that depend on how the file was read, not on what was built.
_HOW = {"seconds", "read_engines", "output"}


def _write_regions(folder: Path) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    cells = [box(i * 0.01, j * 0.01, (i + 1) * 0.01, (j + 1) * 0.01) for i in range(6) for j in range(5)]
    frame = gpd.GeoDataFrame({"region_id": [f"c{i}" for i in range(30)]}, geometry=cells, crs="EPSG:4326")
    frame.to_file(folder / "regions.gpkg")
    return folder / "regions.gpkg"


def _pois(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Seeded POIs: most inside the grid, some outside, some exactly on shared borders, NA and unknown values."""
    rng = np.random.default_rng(seed)
    lon = rng.uniform(-0.005, 0.065, n)
    lat = rng.uniform(0.0, 0.05, n)
    lon[:12], lat[:12] = np.repeat([0.01, 0.02, 0.03], 4), np.tile([0.01, 0.02, 0.025, 0.04], 3)  # borders
    category = rng.choice(["food", "shop", "school", "bar", "casino"], n).astype(object)
    category[[20, 90, n - 7]] = None
    return pd.DataFrame({"lon": lon, "lat": lat, "category": category})


def _write_csv(folder: Path, pois: pd.DataFrame, quoted: bool = False) -> Path:
    text = pois.assign(category=pois["category"].fillna("")).to_csv(index=False, lineterminator="\n")
    lines = text.splitlines()
    lines[30] = lines[30] + ",extra"  # a malformed row (one field too many)
    lines[40] = "abc," + lines[40].split(",", 1)[1]  # a longitude that is not a number
    lines[50] = "," + lines[50].split(",", 1)[1]  # no longitude
    lines.insert(60, "")  # a blank line, skipped
    if quoted:
        lines[70] = lines[70].rsplit(",", 1)[0] + ',"sh,op"'
    path = folder / ("quoted.csv" if quoted else "pois.csv")
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_parquet(folder: Path, pois: pd.DataFrame) -> Path:
    pois.to_parquet(folder / "pois.parquet", index=False)
    return folder / "pois.parquet"


def _write_geoparquet(folder: Path, pois: pd.DataFrame) -> Path:
    """Points in web Mercator (reprojected on reading), a few polygons and a few without geometry."""
    import geopandas as gpd
    from shapely.geometry import Point

    geoms: list[Any] = [Point(x, y) for x, y in zip(pois["lon"], pois["lat"], strict=True)]
    for i in (5, 15, 25):
        geoms[i] = geoms[i].buffer(0.001)
    for i in (33, 77):
        geoms[i] = None
    frame = gpd.GeoDataFrame({"category": pois["category"]}, geometry=geoms, crs="EPSG:4326").to_crs("EPSG:3857")
    frame.to_parquet(folder / "pois_geo.parquet")
    return folder / "pois_geo.parquet"


def _same_build(spec: BuildSpec) -> None:
    memory = build_city(BuildSpec(**{**spec.__dict__, "build_engine": "memory"}))
    streamed = build_city(BuildSpec(**{**spec.__dict__, "build_engine": "streaming"}))
    assert set(streamed.report.read_engines.values()) == {"streaming"}
    assert set(memory.report.read_engines.values()) == {"memory"}
    assert set(streamed.city.views) == set(memory.city.views)
    for name, view in memory.city.views.items():
        mine = streamed.city.views[name]
        if is_sparse_view(view):
            assert is_sparse_view(mine) and (view_csr(mine) != view_csr(view)).nnz == 0, name
            assert mine.dtypes.iloc[0] == view.dtypes.iloc[0]
            assert list(mine.index) == list(view.index)
        else:
            pd.testing.assert_frame_equal(mine, view)
    if memory.od_pattern_rows is not None:
        assert streamed.od_pattern_rows is not None
        pd.testing.assert_frame_equal(streamed.od_pattern_rows, memory.od_pattern_rows)
    pd.testing.assert_frame_equal(streamed.city.regions.drop(columns="geometry"),
                                  memory.city.regions.drop(columns="geometry"))
    mine = {k: v for k, v in streamed.report.to_dict().items() if k not in _HOW}
    theirs = {k: v for k, v in memory.report.to_dict().items() if k not in _HOW}
    assert mine == theirs
    assert streamed.city.meta["notes"] == memory.city.meta["notes"]


@pytest.mark.parametrize(("fmt", "categories"), [
    ("csv", None), ("csv", ["food", "shop"]), ("csv", {"eat": ["food", "bar"], "buy": ["shop"]}),
    ("quoted", None), ("parquet", ["food", "shop"]), ("geoparquet", {"eat": ["food", "bar"], "buy": ["shop"]}),
])
def test_streamed_polygon_build_is_the_in_memory_build(tmp_path: Path, fmt: str, categories: Any) -> None:
    """Many chunks (a GeoParquet chunk reprojects on its own, so fewer there to keep the test fast)."""
    pois = _pois()
    path = {"csv": lambda: _write_csv(tmp_path, pois), "quoted": lambda: _write_csv(tmp_path, pois, quoted=True),
            "parquet": lambda: _write_parquet(tmp_path, pois),
            "geoparquet": lambda: _write_geoparquet(tmp_path, pois)}[fmt]()
    spec = BuildSpec("toy", regions=_write_regions(tmp_path), pois=path, categories=categories,
                     chunk_rows=60 if fmt == "geoparquet" else 7)
    _same_build(spec)


@pytest.mark.parametrize("fmt", ["csv", "geoparquet"])
def test_streamed_h3_build_is_the_in_memory_build(tmp_path: Path, fmt: str) -> None:
    pois = _pois(n=600, seed=1)
    path = _write_csv(tmp_path, pois) if fmt == "csv" else _write_geoparquet(tmp_path, pois)
    _same_build(BuildSpec("toy", boundary=BOX, h3_resolution=9, pois=path, chunk_rows=50 if fmt == "csv" else 150))


@pytest.mark.parametrize("case", ["coordinates", "h3", "ids-weighted", "sparse"])
def test_streamed_trips_are_the_in_memory_trips(raw_city: dict[str, Path], tmp_path: Path, case: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Trips with times (patterns), a missing end, ends outside; by coordinates, by region ids with counts, over H3
    cells, and above the sparse threshold (the OD matrix as CSR, the patterns as rows)."""
    import urbanprofile.data.build.trips as trips_module

    trips = raw_city["trips"]
    settings: dict[str, Any] = {"regions": raw_city["regions"], "region_id_column": "region_id"}
    if case == "h3":
        settings = {"boundary": BOX, "h3_resolution": 9}
    if case == "ids-weighted":
        rng = np.random.default_rng(3)
        ids = [f"c{i}{j}" for i in range(6) for j in range(5)] + ["elsewhere", ""]
        table = pd.DataFrame({"origin": rng.choice(ids, 300), "destination": rng.choice(ids, 300),
                              "trips": rng.integers(0, 5, 300), "time": rng.uniform(0, 24, 300).round(2)})
        table.loc[12, "trips"] = None
        trips = tmp_path / "od.parquet"
        table.to_parquet(trips, index=False)
    if case == "sparse":
        monkeypatch.setattr(trips_module, "SPARSE_VIEW_ABOVE", 10)
    _same_build(BuildSpec("toy", trips=trips, chunk_rows=23, **settings))


def test_h3_cells_from_h3_match_the_polygon_join_on_borders_and_vertices() -> None:
    """Points at cell vertices and on edges (where h3 and the straight-edged polygons may disagree) and points
    outside every cell are assigned as the polygon join assigns them."""
    import h3

    regions = h3_regions(read_boundary(BOX), 9)
    rng = np.random.default_rng(2)
    vertices = np.array([v for cell in regions.index[:40] for v in h3.cell_to_boundary(cell)])  # (lat, lng)
    a, b = vertices[:-1], vertices[1:]
    middles = (a + b) / 2  # edge midpoints
    lat = np.concatenate([vertices[:, 0], middles[:, 0], rng.uniform(-0.01, 0.06, 500)])
    lon = np.concatenate([vertices[:, 1], middles[:, 1], rng.uniform(-0.01, 0.07, 500)])
    joiner = RegionJoiner(regions, h3_resolution=9)
    expected = assign_points(lon, lat, regions)
    np.testing.assert_array_equal(joiner.assign(lon, lat), expected)
    # the fast path decides the points well inside a cell, and none on a vertex
    inside = expected >= 0
    clear = joiner._clearly_inside(expected[inside], lon[inside], lat[inside])
    n_random = int(inside[-500:].sum())
    assert clear[-n_random:].mean() > 0.95 and not clear[: len(vertices)].any()
    np.testing.assert_array_equal(RegionJoiner(regions).assign(lon, lat), assign_points(lon, lat, regions))


def test_chunks_keep_the_file_line_numbers(tmp_path: Path) -> None:
    path = _write_csv(tmp_path, _pois(n=100))
    chunks = list(point_chunks(path, chunk_rows=9))
    assert len(chunks) > 5
    numbers = np.concatenate([c.numbers for c in chunks])
    assert numbers[0] == 2 and 31 not in numbers  # line 31 is the malformed row (the header is line 1)
    assert sum(c.n_malformed for c in chunks) == 1 and sum(c.n_unreadable for c in chunks) == 1
    assert next(c.example for c in chunks if c.example) == f"first: {path} line 41 lon='abc'"


def test_auto_streams_large_table_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urbanprofile.data.build.streaming as streaming

    csv = _write_csv(tmp_path, _pois(n=100))
    spec = BuildSpec("toy", regions=csv, pois=csv)
    assert choose_engine(spec, csv) == "memory"
    monkeypatch.setattr(streaming, "STREAMING_ABOVE_BYTES", 10)
    assert choose_engine(spec, csv) == "streaming"
    osm = tmp_path / "x.osm.pbf"
    osm.write_bytes(b"0" * 100)
    assert choose_engine(spec, osm) == "memory"


def _build(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
           *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "build", "toy", "--out", str(tmp_path / "out"), *args)


@pytest.mark.parametrize("engine", ["auto", "streaming"])
def test_an_osm_file_that_is_not_pbf_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], engine: str) -> None:
    bad = tmp_path / "city.osm.pbf"
    bad.write_bytes(b"<?xml version='1.0'?><osm></osm>\n")
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--regions", str(_write_regions(tmp_path)), "--pois",
                             str(bad), "--engine", engine)
    assert_one_error(code, stderr, str(bad))
    assert not (tmp_path / "out").exists()


def test_a_truncated_osm_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import pyrosm

    source = Path(pyrosm.get_data("test_pbf"))
    cut = tmp_path / "cut.osm.pbf"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--boundary", str(cut), "--h3-res", "8")
    assert_one_error(code, stderr, str(cut))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["memory", "streaming"])
def test_geoparquet_without_crs_or_geometry_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], engine: str) -> None:
    import geopandas as gpd
    import pyarrow.parquet as pq
    from shapely.geometry import Point

    regions = str(_write_regions(tmp_path))
    no_crs = tmp_path / "no_crs.parquet"
    gpd.GeoDataFrame({"category": ["food"]}, geometry=[Point(0.01, 0.01)], crs=None).to_parquet(no_crs)
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--regions", regions, "--pois", str(no_crs),
                             "--engine", engine)
    assert_one_error(code, stderr, str(no_crs), "CRS")
    table = pq.read_table(no_crs)
    meta = json.loads(table.schema.metadata[b"geo"])
    meta["primary_column"] = "shape"  # metadata naming a geometry column that is not there
    no_geometry = tmp_path / "no_geometry.parquet"
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(meta).encode()}), no_geometry)
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--regions", regions, "--pois", str(no_geometry),
                             "--engine", engine)
    assert_one_error(code, stderr, str(no_geometry))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--h3-res", "16"], "--h3-res must be in 0..15"), (["--h3-res", "-1"], "--h3-res must be in 0..15"),
    (["--h3-res", "9", "--engine", "disk"], "unknown build engine 'disk'"),
    (["--h3-res", "9", "--chunk-rows", "0"], "--chunk-rows must be >= 1"),
])
def test_bad_settings_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], flags: list[str], fragment: str) -> None:
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--boundary", BOX, *flags)
    assert_one_error(code, stderr, fragment)


def test_a_streamed_build_that_fails_late_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A bad row in the last chunk stops the build after most chunks were counted: no folder is written, and an
    existing dataset that --overwrite would replace is kept as it was."""
    regions = str(_write_regions(tmp_path))
    good = _write_csv(tmp_path, _pois())
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--regions", regions, "--pois", str(good))
    assert code == 0, stderr
    before = {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()}
    bad = tmp_path / "late.csv"
    bad.write_text(good.read_text() + "500000,500000,food\n")  # not degrees, in the last chunk only
    code, _, stderr = _build(monkeypatch, capsys, tmp_path, "--regions", regions, "--pois", str(bad),
                             "--engine", "streaming", "--chunk-rows", "25", "--overwrite")
    assert_one_error(code, stderr, str(bad), "not lon/lat degrees")
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file()} == before
    code, _, stderr = run_cli(monkeypatch, capsys, "build", "toy", "--out", str(tmp_path / "fresh"), "--regions",
                              regions, "--pois", str(bad), "--engine", "streaming", "--chunk-rows", "25")
    assert code == 2 and not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("keep", [0, 3, 12, 200, -1])
def test_pbf_framing_finds_any_cut(tmp_path: Path, keep: int) -> None:
    """An empty file, a cut inside the first length, inside a block header, inside a block, or one byte short."""
    import pyrosm

    from urbanprofile.data.build.osm import check_pbf
    from urbanprofile.errors import DataError

    data = Path(pyrosm.get_data("test_pbf")).read_bytes()
    check_pbf(Path(pyrosm.get_data("test_pbf")))  # the whole file passes
    cut = tmp_path / "cut.osm.pbf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(DataError, match=r"cut\.osm\.pbf: (truncated|not an) OSM PBF file"):
        check_pbf(cut)
