"""Bulk H3 cells (issue 22): the same cells, polygons and centres as one h3 call per cell, and a build that writes a
large city's OD matrix without a pandas sparse view gives the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from urbanprofile.data.build.h3_fast import cell_boundaries, cell_centres, cell_polygons
from urbanprofile.data.build.pipeline import build_city, build_dataset
from urbanprofile.data.build.regions import h3_regions
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.data.loaders.built import load_built, write_built
from urbanprofile.errors import DataError

h3 = pytest.importorskip("h3")
shapely = pytest.importorskip("shapely")
gpd = pytest.importorskip("geopandas")


def _reference_regions(boundary: gpd.GeoDataFrame, resolution: int, cover: bool) -> gpd.GeoDataFrame:
    """The cut as it was written before (one shapely Polygon and one h3 call per cell), to compare against."""
    from shapely.geometry import Polygon

    shape = boundary.geometry.make_valid().union_all()
    cells = set(h3.geo_to_cells(shape, resolution))

    def polygon(cell: str) -> Polygon:
        return Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(cell)])

    if cover:
        if not cells:
            point = shape.representative_point()
            cells = {h3.latlng_to_cell(point.y, point.x, resolution)}
        frontier = set(cells)
        while frontier:
            ring = {n for c in frontier for n in h3.grid_disk(c, 1)} - cells
            frontier = {c for c in ring if polygon(c).intersects(shape)}
            cells |= frontier
    ordered = sorted(cells)
    centres = np.array([h3.cell_to_latlng(c) for c in ordered]).reshape(-1, 2)
    return gpd.GeoDataFrame({"lon": centres[:, 1], "lat": centres[:, 0]},
                            index=pd.Index(ordered, name="region_id", dtype=str),
                            geometry=[polygon(c) for c in ordered], crs="EPSG:4326")


def _boundary(geom: object) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(geometry=[geom], crs="EPSG:4326")


BOUNDARIES = {
    "box": shapely.box(8.50, 47.35, 8.56, 47.39),
    # Concave, with a hole and a narrow neck: the cover grows over several rings.
    "concave": shapely.Polygon([(8.5, 47.3), (8.6, 47.3), (8.6, 47.36), (8.552, 47.33), (8.548, 47.33), (8.5, 47.36)],
                               holes=[[(8.52, 47.31), (8.53, 47.31), (8.53, 47.315), (8.52, 47.315)]]),
    "tiny": shapely.box(8.5400, 47.3700, 8.5401, 47.3701),  # smaller than one cell
    "two parts": shapely.MultiPolygon([shapely.box(8.50, 47.35, 8.52, 47.36), shapely.box(8.60, 47.40, 8.61, 47.41)]),
    "near a pentagon": shapely.box(10.2, 63.9, 10.8, 64.3),  # res-3 pentagon 830847fffffffff's neighbourhood
}


@pytest.mark.parametrize("name", list(BOUNDARIES))
@pytest.mark.parametrize("cover", [True, False])
def test_regions_are_the_cells_of_one_call_per_cell(name: str, cover: bool) -> None:
    boundary = _boundary(BOUNDARIES[name])
    resolution = 6 if name == "near a pentagon" else 9
    expected = _reference_regions(boundary, resolution, cover)
    if not len(expected):
        with pytest.raises(DataError, match="holds no H3 cell centre"):
            h3_regions(boundary, resolution, cover)
        return
    got = h3_regions(boundary, resolution, cover)
    assert got.index.equals(expected.index)
    assert np.array_equal(got[["lon", "lat"]].to_numpy(), expected[["lon", "lat"]].to_numpy())
    # Vertex for vertex, so the written regions.parquet is byte-identical in its geometry column.
    assert list(shapely.to_wkb(got.geometry.to_numpy())) == list(shapely.to_wkb(expected.geometry.to_numpy()))


def test_pentagons_and_distorted_cells_keep_their_vertices(monkeypatch: pytest.MonkeyPatch) -> None:
    pentagons = sorted(h3.get_pentagons(2))[:3]  # 5 vertices
    # At an odd (class III) resolution, cells crossing an icosahedron edge have 7 to 10 vertices.
    distorted = sorted(h3.grid_disk(sorted(h3.get_pentagons(1))[0], 1))
    cells = [*pentagons, *distorted, *sorted(h3.grid_disk("89283082803ffff", 1))]
    coords, counts = cell_boundaries(cells)
    assert counts.tolist() == [len(h3.cell_to_boundary(c)) for c in cells]
    assert counts.min() == 5 and counts.max() == 10 and 6 in counts  # unequal rings side by side
    assert coords.shape == (int(counts.sum()), 2)
    import urbanprofile.data.build.h3_fast as h3_fast

    monkeypatch.setattr(h3_fast, "BATCH_CELLS", 4)  # several batches of unequal rings
    polygons = cell_polygons(cells)
    for cell, polygon in zip(cells, polygons, strict=True):
        ring = [(lng, lat) for lat, lng in h3.cell_to_boundary(cell)]
        assert shapely.get_coordinates(polygon).tolist() == [*map(list, ring), list(ring[0])]
    lon, lat = cell_centres(cells)
    assert np.array_equal(np.column_stack([lat, lon]), np.array([h3.cell_to_latlng(c) for c in cells]))
    assert len(cell_polygons([])) == 0 and cell_boundaries([])[0].shape == (0, 2)


def _trip_city(folder: Path, n_trips: int = 4000) -> BuildSpec:
    """A box of about 3,600 resolution-10 cells (above the sparse OD threshold), with seeded POIs and trips."""
    rng = np.random.default_rng(3)
    west, south, east, north = 8.50, 47.35, 8.60, 47.41
    pois = pd.DataFrame({"lon": rng.uniform(west, east, 3000), "lat": rng.uniform(south, north, 3000),
                         "category": rng.choice(["food", "shop", "school"], 3000)})
    pois.to_parquet(folder / "pois.parquet", index=False)
    trips = pd.DataFrame({"o_lon": rng.uniform(west, east, n_trips), "o_lat": rng.uniform(south, north, n_trips),
                          "d_lon": rng.uniform(west, east, n_trips), "d_lat": rng.uniform(south, north, n_trips),
                          "time": rng.uniform(0, 24, n_trips)})
    trips.to_parquet(folder / "trips.parquet", index=False)
    return BuildSpec("fast", boundary=f"{west},{south},{east},{north}", h3_resolution=10, pois=folder / "pois.parquet",
                     trips=folder / "trips.parquet", max_cells=10_000)


def test_build_writes_the_od_matrix_as_the_sparse_view_would(tmp_path: Path) -> None:
    spec = _trip_city(tmp_path)
    out = tmp_path / "out"
    build_dataset(spec, out)
    built = build_city(spec)  # with the pandas sparse view, as callers of build_city get it
    assert "od_flows" in built.city.views and built.od_matrix is None
    reference = tmp_path / "reference"
    write_built(built.city, reference, {}, od_pattern_rows=built.od_pattern_rows)
    for name in ("regions", "poi_counts", "od_flows", "od_patterns"):
        assert pd.read_parquet(out / f"{name}.parquet").equals(pd.read_parquet(reference / f"{name}.parquet")), name
    loaded = load_built(out)
    assert loaded.views["od_flows"].sparse.to_coo().sum() > 0  # read back as the sparse view
    lean = build_city(spec, sparse_od_view=False)
    assert "od_flows" not in lean.city.views
    assert lean.od_matrix.sum() == built.city.views["od_flows"].sparse.to_coo().sum()
    assert "od_flows" in lean.city.meta["units"]


def test_a_negative_od_matrix_is_refused_and_nothing_written(tmp_path: Path) -> None:
    spec = _trip_city(tmp_path, n_trips=500)
    lean = build_city(spec, sparse_od_view=False)
    bad = lean.od_matrix.tocsr().astype(float)
    bad.data[0] = -1.0
    with pytest.raises(DataError, match=r"od_flows.*negative or non-finite"):
        write_built(lean.city, tmp_path / "out", {}, od_matrix=bad)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
