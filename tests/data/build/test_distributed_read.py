"""A distributed build whose workers read their own shares of a Parquet or GeoParquet POI file and of a Parquet trip
file: the client never reads their rows, and the folder is the single-machine one, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_raw_city

from tests.data.build.test_distributed import _assert_same_dataset
from urbanprofile.data.build import BuildSpec, build_dataset
from urbanprofile.data.build import streaming as streaming_module
from urbanprofile.data.build.distributed import DaskJoiner, _read_share, parquet_shares
from urbanprofile.errors import DataError, UrbanProfileError

distributed = pytest.importorskip("distributed")
pytest.importorskip("h3")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROW_GROUP = 150  # several row groups per file, shares of two of them at chunk_rows=300


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy city's POIs as Parquet (coordinates as text, so some are unreadable or missing, as in a CSV) and as
    GeoParquet (some features without geometry), in row groups of 150, with points on region corners."""
    import geopandas as gpd

    folder = tmp_path_factory.mktemp("raw")
    files = write_raw_city(folder, n_pois=1000, n_trips=50)
    pois = pd.read_csv(files["pois"])
    corners = pd.DataFrame([(x / 100, y / 100, "food") for x in range(7) for y in range(6)],
                           columns=["lon", "lat", "category"])
    pois = pd.concat([pois, corners], ignore_index=True)
    text = pois.assign(lon=pois["lon"].map(repr), lat=pois["lat"].map(repr))
    text.loc[17, "lon"] = "12,5"  # unreadable
    text.loc[400, "lat"] = None  # no location
    text.loc[620, "category"] = None  # no category
    pq.write_table(pa.Table.from_pandas(text, preserve_index=False), folder / "pois.parquet",
                   row_group_size=ROW_GROUP)
    geo = gpd.GeoDataFrame(pois[["category"]], geometry=gpd.points_from_xy(pois["lon"], pois["lat"]),
                           crs="EPSG:4326")
    geo.loc[[3, 777], "geometry"] = None
    geo.to_parquet(folder / "pois_geo.parquet", row_group_size=ROW_GROUP)
    # Points around (10 E, 40 N) written with the axes swapped: found only by the second, swapped pass.
    far = pois.assign(lon=pois["lon"] + 10, lat=pois["lat"] + 40)
    far.rename(columns={"lon": "lat", "lat": "lon"}).to_parquet(folder / "swapped.parquet", row_group_size=ROW_GROUP)
    # Trips with fractional counts (summed in the same order only if the chunks are the same rows), coordinates as
    # text (one unreadable, one missing), in row groups of 70 against chunks of 100.
    rng = np.random.default_rng(5)
    n = 430
    trips = pd.DataFrame({"o_lon": rng.uniform(0, 0.06, n), "o_lat": rng.uniform(0, 0.05, n),
                          "d_lon": rng.uniform(-0.01, 0.06, n), "d_lat": rng.uniform(0, 0.05, n)}).map(repr)
    trips.loc[11, "o_lon"] = "x"
    trips.loc[250, "d_lat"] = None
    trips["time"] = rng.uniform(0, 24, n).round(2)
    trips["trips"] = rng.choice([0.1, 0.7, 1.3, 2.0], n)
    pq.write_table(pa.Table.from_pandas(trips, preserve_index=False), folder / "trips.parquet", row_group_size=70)
    ids = pd.DataFrame({"origin": rng.choice([f"c{i}{j}" for i in range(6) for j in range(5)] + ["zz"], n),
                        "destination": rng.choice([f"c{i}{j}" for i in range(6) for j in range(5)], n),
                        "count": rng.integers(0, 5, n)})
    ids.to_parquet(folder / "trip_ids.parquet", index=False, row_group_size=70)
    return {**files, "pois_parquet": folder / "pois.parquet", "pois_geo": folder / "pois_geo.parquet",
            "swapped": folder / "swapped.parquet", "trips_parquet": folder / "trips.parquet",
            "trip_ids": folder / "trip_ids.parquet"}


def _spec(raw: dict[str, Path], pois: str, kind: str) -> BuildSpec:
    common = {"pois": raw[pois], "build_engine": "streaming", "chunk_rows": 300}
    if kind == "polygon":
        return BuildSpec(city="toy", regions=raw["regions"], region_name_column="name",
                         categories=["food", "shop", "school"], landuse=raw["landuse"], **common)
    return BuildSpec(city="toyh3", boundary="0,0,0.06,0.05", h3_resolution=9, trips=raw["trips"], **common)


def _client_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading a point file in this (the client's) process fail: only the workers may read it."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the client read the POI file")

    monkeypatch.setattr(streaming_module, "point_chunks", refuse)


@pytest.mark.parametrize("pois, kind, parts", [
    ("pois_parquet", "polygon", 4), ("pois_geo", "polygon", 3), ("pois_parquet", "h3", 5),
    pytest.param("pois_geo", "h3", 1, marks=pytest.mark.scale),
])
def test_workers_read_their_shares(raw: dict[str, Path], client: object, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, pois: str, kind: str, parts: int) -> None:
    spec = _spec(raw, pois, kind)
    single = build_dataset(spec, tmp_path / "single")
    _client_cannot_read(monkeypatch)
    joiner = DaskJoiner(client, parts, h3_resolution=9 if kind == "h3" else None)
    spread = build_dataset(spec, tmp_path / "spread", joiner=joiner)
    _assert_same_dataset(tmp_path / "single", tmp_path / "spread")
    # 1,042 rows in row groups of 150 on 2 workers: shares of at most 1042 / 4 rows, so one row group each.
    shares = parquet_shares(raw[pois], 261)
    assert len(shares) == 7 and [first for _, first in shares] == [0, 150, 300, 450, 600, 750, 900]
    assert joiner.figures.shares_read_on_workers == len(shares)
    located = single.n_pois_read - single.n_pois_missing_location - single.n_pois_unreadable - \
        single.n_pois_malformed
    trip_ends = 2 * (single.n_trips_read - single.n_trips_missing - single.n_trips_unreadable
                     - single.n_trips_malformed)  # the trips CSV, read on the client, joined on the workers
    assert joiner.figures.points_routed == located + trip_ends
    assert single.n_pois_joined > 900 and single.n_pois_missing_location >= 1
    assert single.unreadable_example == spread.unreadable_example
    if pois == "pois_parquet":
        assert single.n_pois_unreadable == 1 and "row 18" in single.unreadable_example


@pytest.mark.parametrize("trips, kind", [("trips_parquet", "h3"), ("trip_ids", "polygon"),
                                         pytest.param("trips_parquet", "polygon", marks=pytest.mark.scale)])
def test_workers_read_trip_chunks(raw: dict[str, Path], client: object, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, trips: str, kind: str) -> None:
    """Parquet trips are read on the workers chunk by chunk, the same rows as the client's chunks on one machine
    (row groups of 70, chunks of 100), so fractional counts sum to the same floats."""
    spec = _spec(raw, "pois_parquet", kind)
    spec.trips, spec.chunk_rows = raw[trips], 100
    single = build_dataset(spec, tmp_path / "single")
    _client_cannot_read(monkeypatch)
    monkeypatch.setattr(streaming_module, "table_chunks", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the client read the trip file")))
    joiner = DaskJoiner(client, 4, h3_resolution=9 if kind == "h3" else None)
    spread = build_dataset(spec, tmp_path / "spread", joiner=joiner)
    _assert_same_dataset(tmp_path / "single", tmp_path / "spread")
    assert single.n_trips_kept > 100 and single.n_trips_kept == spread.n_trips_kept
    if trips == "trips_parquet":
        assert single.n_trips_unreadable == 1 and single.n_trips_missing >= 1 and single.trips_weighted_kept % 1
    assert joiner.figures.shares_read_on_workers == 7 + 5  # 1,042 POIs in 7 shares, 430 trips in 5 chunks


def test_same_errors_as_one_machine(raw: dict[str, Path], client: object, tmp_path: Path) -> None:
    """Swapped axes and a missing category column stop the distributed build with the single-machine line."""
    swapped = BuildSpec(city="far", boundary="10,40,10.06,40.05", h3_resolution=9, pois=raw["swapped"],
                        build_engine="streaming", chunk_rows=300)
    missing_column = _spec(raw, "pois_parquet", "polygon")
    missing_column.category_column = "kind"
    bad_count = _spec(raw, "pois_parquet", "polygon")
    bad_count.trips, bad_count.trip_weight_column = raw["trips_parquet"], "o_lon"  # 'x' at row 12 is no count
    for pois, spec in [("swapped", swapped), ("pois_parquet", missing_column), ("trips", bad_count)]:
        with pytest.raises(DataError) as single:
            build_dataset(spec, tmp_path / "single")
        with pytest.raises(UrbanProfileError) as spread:
            build_dataset(spec, tmp_path / "spread", joiner=DaskJoiner(client, 3, spec.h3_resolution))
        assert str(spread.value) == str(single.value)
        assert {"swapped": "--lon-column lat", "pois_parquet": "no column 'kind'",
                "trips": "row 12: trip count 'o_lon'"}[pois] in str(single.value)
        assert not (tmp_path / "spread").exists()


def test_a_path_the_workers_cannot_open(raw: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found on a Dask worker"):
        _read_share(str(tmp_path / "elsewhere.parquet"), [0], 0, _spec(raw, "pois_parquet", "polygon"), "category",
                    False)


def test_shares_are_whole_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"lon": np.zeros(1000), "lat": np.zeros(1000)}), path, row_group_size=300)
    assert parquet_shares(path, 600) == [([0, 1], 0), ([2, 3], 600)]  # 300 + 300, then 300 + 100
    assert parquet_shares(path, 100) == [([0], 0), ([1], 300), ([2], 600), ([3], 900)]  # a group is never cut
    assert parquet_shares(path, 10_000) == [([0, 1, 2, 3], 0)]


def test_a_workers_chunk_is_the_clients_chunk(raw: dict[str, Path]) -> None:
    """The rows a worker reads for chunk k are the k-th chunk of the single-machine streamed read (which crosses row
    groups), row numbers included: the merged float sums rest on it."""
    from urbanprofile.data.build.distributed import _read_rows
    from urbanprofile.data.build.streaming import table_chunks

    path = raw["trips_parquet"]
    chunks = list(table_chunks(path, 100))
    assert [len(c.frame) for c in chunks] == [100, 100, 100, 100, 30]
    for k, chunk in enumerate(chunks):
        mine = _read_rows(str(path), 100 * k, min(100 * (k + 1), 430))
        pd.testing.assert_frame_equal(mine.frame, chunk.frame)
        assert mine.lines.tolist() == chunk.lines.tolist()
