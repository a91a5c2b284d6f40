"""srai's embedders as methods and urbanprofile's methods called the srai way (skipped without srai)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Polygon

pytest.importorskip("srai")
pytest.importorskip("pytorch_lightning")
h3 = pytest.importorskip("h3")

from urbanprofile.data import make_synthetic_city  # noqa: E402
from urbanprofile.data.city import CityData  # noqa: E402
from urbanprofile.embedders import srai as srai_adapters  # noqa: E402
from urbanprofile.embedders.srai import (  # noqa: E402
    city_neighbourhood,
    city_to_srai,
    srai_counts,
)
from urbanprofile.errors import DataError, MethodUnavailableError, NotFittedError  # noqa: E402
from urbanprofile.evaluation import evaluate_embedding  # noqa: E402
from urbanprofile.interop.srai import SraiStyleEmbedder  # noqa: E402
from urbanprofile.methods import get_method  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
FAST_HEX2VEC = {"encoder_sizes": (16, 8), "epochs": 2}


@pytest.fixture(scope="module")
def city() -> CityData:
    return make_synthetic_city(n_regions=49, n_poi_categories=6, random_state=0)


@pytest.fixture(scope="module")
def h3_city() -> CityData:
    return make_h3_city()


def make_h3_city() -> CityData:
    """61 H3 cells (a Berlin cell and four rings around it) with Poisson POI counts."""
    cells = sorted(h3.grid_disk(h3.latlng_to_cell(52.52, 13.40, 9), 4))
    ids = pd.Index(cells, name="region_id")
    centres = np.array([h3.cell_to_latlng(c) for c in cells])
    polygons = [Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(c)]) for c in cells]
    regions = gpd.GeoDataFrame({"lon": centres[:, 1], "lat": centres[:, 0]}, index=ids, geometry=polygons,
                               crs="EPSG:4326")
    rng = np.random.default_rng(0)
    counts = pd.DataFrame(rng.poisson(3, size=(len(cells), 6)), index=ids, columns=[f"poi_{k}" for k in range(6)])
    return CityData("h3-toy", regions, {"poi_counts": counts}, meta={"h3_resolution": 9}).validate()


def _build(name: str, random_state: int = 0, **params: object):
    embedder = get_method(name).build(random_state=random_state)
    for key, value in params.items():
        setattr(embedder, key, value)
    return embedder


# -- our city as srai's frames ----------------------------------------------------------------------------
def test_frames_round_trip_through_srai_count_embedder(city: CityData) -> None:
    from srai.embedders import CountEmbedder

    regions, features, joint = city_to_srai(city)
    counts = city.view("poi_counts")
    assert regions.index.name == "region_id" and features.index.name == "feature_id"
    assert list(joint.index.names) == ["region_id", "feature_id"]
    assert len(features) == int(counts.to_numpy().sum())
    theirs = CountEmbedder().transform(regions, features, joint).reindex(city.region_ids)
    theirs = theirs[[f"category_{c}" for c in counts.columns]]
    assert np.array_equal(theirs.to_numpy(), counts.to_numpy())
    ours = srai_counts(regions, features, joint)[[f"category_{c}" for c in counts.columns]]
    assert np.array_equal(ours.to_numpy(), counts.to_numpy())


def test_srai_count_equals_raw_poi(city: CityData) -> None:
    embedding = get_method("srai-count").build(random_state=0).fit_transform(city)
    raw = get_method("raw-poi").build(random_state=0).fit_transform(city)
    assert embedding.index.equals(city.region_ids) and embedding.index.name == "region_id"
    assert np.array_equal(embedding.to_numpy(), raw.to_numpy())


def test_contextual_count_adds_the_neighbour_ring_average(city: CityData) -> None:
    embedding = get_method("srai-contextual-count").build(random_state=0).fit_transform(city)
    counts = city.view("poi_counts").to_numpy(dtype=float)
    d = counts.shape[1]
    assert embedding.shape == (city.n_regions, 3 * d)  # the region and rings 1 and 2, concatenated
    assert np.array_equal(embedding.to_numpy()[:, :d], counts)
    position = {r: i for i, r in enumerate(city.region_ids)}
    assert city.neighbors is not None
    for region in list(city.region_ids)[:10]:
        ring = [position[n] for n in city.neighbors[region]]
        expected = counts[ring].mean(axis=0)
        assert np.allclose(embedding.to_numpy()[position[region], d:2 * d], expected)


def test_neighbourhood_follows_the_region_kind(city: CityData, h3_city: CityData) -> None:
    from shapely.geometry import box

    assert city_neighbourhood(city)[1] == "shared borders (dataset)"
    step = 1 / 128  # exact in binary, so the squares share their edges exactly
    squares = [box(i * step, j * step, (i + 1) * step, (j + 1) * step) for j in range(5) for i in range(5)]
    ids = pd.Index(range(25), name="region_id")
    grid = gpd.GeoDataFrame(index=ids, geometry=squares, crs="EPSG:4326")
    counts = pd.DataFrame(np.ones((25, 2), dtype=int), index=ids, columns=["poi_0", "poi_1"])
    neighbourhood, source = city_neighbourhood(CityData("grid", grid, {"poi_counts": counts}))
    assert source == "shared borders (geometry)"
    assert neighbourhood.get_neighbours(12) == {6, 7, 8, 11, 13, 16, 17, 18}  # edges and corners touch
    assert neighbourhood.get_neighbours(0) == {1, 5, 6}
    points = city.regions.copy()
    points.geometry = gpd.points_from_xy(points["lon"], points["lat"])
    point_city = CityData(city.name, points, dict(city.views))
    neighbourhood, source = city_neighbourhood(point_city)
    assert source == "6 nearest centroids"
    for region in point_city.region_ids:  # made symmetric: a region is its neighbours' neighbour
        assert len(neighbourhood.get_neighbours(region)) >= 6
        for other in neighbourhood.get_neighbours(region):
            assert region in neighbourhood.get_neighbours(other)
    assert city_neighbourhood(h3_city)[1] == "H3 cells"


# -- hex2vec ----------------------------------------------------------------------------------------------
def test_hex2vec_is_seeded_quiet_and_writes_nothing(city: CityData, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = _build("hex2vec", 0, **FAST_HEX2VEC).fit_transform(city)
    b = _build("hex2vec", 0, **FAST_HEX2VEC).fit_transform(city)
    c = _build("hex2vec", 1, **FAST_HEX2VEC).fit_transform(city)
    assert a.shape == (city.n_regions, 8) and a.index.equals(city.region_ids)
    assert np.isfinite(a.to_numpy()).all()
    assert np.array_equal(a.to_numpy(), b.to_numpy())
    assert not np.allclose(a.to_numpy(), c.to_numpy())
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's numpy generator is left alone
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/ or checkpoints
    out = capsys.readouterr()
    assert "GPU available" not in out.out + out.err


def test_hex2vec_on_h3_cells_is_the_same_in_every_process(tmp_path: Path) -> None:
    # H3 ids are strings, and Python walks a set of strings in an order set by its per-process hash seed: the
    # same seed once trained another hex2vec in each process (srai builds its training pairs from such sets).
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; "
              "from test_srai import FAST_HEX2VEC, _build, make_h3_city; "
              "np.save(sys.argv[2], _build('hex2vec', 0, **FAST_HEX2VEC).fit_transform(make_h3_city()).to_numpy())")
    for hash_seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / f"{hash_seed}.npy")],
                       env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True, capture_output=True)
    assert np.array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "2.npy"))


def test_hex2vec_embedding_can_be_probed(city: CityData) -> None:
    embedding = _build("hex2vec", 0, **FAST_HEX2VEC).fit_transform(city)
    result = evaluate_embedding(city, embedding, task=city.tasks[0], protocol="nested")
    assert np.isfinite(result.metrics["r2"])


def test_hex2vec_refuses_a_city_too_small_for_negatives() -> None:
    tiny = make_synthetic_city(n_regions=9, n_poi_categories=4, random_state=0)
    with pytest.raises(MethodUnavailableError, match="no negative to sample"):
        _build("hex2vec", 0, **FAST_HEX2VEC).fit(tiny)


# -- geovex -----------------------------------------------------------------------------------------------
def test_geovex_runs_on_h3_cells_and_is_seeded(h3_city: CityData) -> None:
    spec = get_method("geovex")
    assert spec.unavailable_reason(h3_city) is None
    params = {"epochs": 2, "embedding_size": 8}
    a = _build("geovex", 0, **params).fit_transform(h3_city)
    b = _build("geovex", 0, **params).fit_transform(h3_city)
    assert a.shape == (h3_city.n_regions, 8) and a.index.equals(h3_city.region_ids)  # edge cells included
    assert np.isfinite(a.to_numpy()).all()
    assert np.array_equal(a.to_numpy(), b.to_numpy())


def test_geovex_says_why_it_cannot_run_on_polygons(city: CityData) -> None:
    reason = get_method("geovex").unavailable_reason(city)
    assert reason is not None and "H3" in reason and "\n" not in reason
    with pytest.raises(MethodUnavailableError, match="H3"):
        get_method("geovex").check_available(city)


def test_missing_srai_is_a_one_line_reason(city: CityData, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(srai_adapters.importlib.util, "find_spec",
                        lambda name, *a: None if name == "srai" else real(name, *a))
    for name in ("srai-count", "srai-contextual-count", "hex2vec", "geovex"):
        reason = get_method(name).unavailable_reason(city)
        assert reason is not None and "pip install 'urbanprofile[srai]'" in reason


# -- ours, the srai way -----------------------------------------------------------------------------------
def test_srai_style_embedder_returns_srai_convention(city: CityData) -> None:
    regions, features, joint = city_to_srai(city)
    embedder = SraiStyleEmbedder("pca", n_components=4, random_state=0)
    embedding = embedder.fit_transform(regions, features, joint)
    assert embedding.index.equals(regions.index) and embedding.index.name == "region_id"
    assert embedding.shape == (city.n_regions, 4)
    # the same numbers as pca on our own city restricted to its POI view
    ours = get_method("pca").build(random_state=0)
    ours.views = ("poi_counts",)
    ours.n_components = 4
    assert np.allclose(embedding.to_numpy(), ours.fit_transform(city).to_numpy())


def test_srai_style_embedder_transforms_new_regions_with_the_fitted_categories(city: CityData) -> None:
    regions, features, joint = city_to_srai(city)
    embedder = SraiStyleEmbedder("pca", n_components=3).fit(regions, features, joint)
    some = regions.index[:10]
    part_joint = joint[joint.index.get_level_values(0).isin(some)]
    part_features = features.loc[part_joint.index.get_level_values(1)]
    # one category vanishes from the new area and an unseen one appears: srai's expected-features rule
    part_features = part_features.assign(category=part_features["category"].replace({"poi_0": "poi_new"}))
    part = embedder.transform(regions.loc[some], part_features, part_joint)
    assert part.index.equals(some) and part.shape == (10, 3)
    assert np.isfinite(part.to_numpy()).all()


def test_srai_style_embedder_errors(city: CityData) -> None:
    regions, features, joint = city_to_srai(city)
    with pytest.raises(NotFittedError):
        SraiStyleEmbedder("pca").transform(regions, features, joint)
    with pytest.raises(MethodUnavailableError, match="od_flows"):
        SraiStyleEmbedder("hafusion").fit(regions, features, joint)
    stray = pd.DataFrame(index=pd.MultiIndex.from_tuples([(9999, 0)], names=["region_id", "feature_id"]))
    with pytest.raises(DataError, match="region 9999"):
        srai_counts(regions, features, stray)
    with pytest.raises(DataError, match="MultiIndex"):
        srai_counts(regions, features, joint.reset_index(level=1))


def test_srai_style_embedder_rejects_unusable_regions(city: CityData) -> None:
    regions, features, joint = city_to_srai(city)
    with pytest.raises(DataError, match="no CRS"):
        SraiStyleEmbedder("pca").fit(regions.set_crs(None, allow_override=True), features, joint)
    with pytest.raises(DataError, match="no geometry"):
        SraiStyleEmbedder("pca").fit(pd.DataFrame(index=regions.index), features, joint)
    fractional = CityData(city.name, city.regions, {"poi_counts": city.view("poi_counts") + 0.5})
    with pytest.raises(DataError, match="fractional"):
        get_method("srai-count").build(random_state=0).fit_transform(fractional)


def test_boolean_tags_count_where_true() -> None:
    regions = gpd.GeoDataFrame(index=pd.Index(["a", "b"], name="region_id"),
                               geometry=gpd.points_from_xy([0, 1], [0, 1]), crs="EPSG:4326")
    features = gpd.GeoDataFrame({"cafe": [True, False, True], "amenity": ["bank", None, "bank"]},
                                index=pd.Index([0, 1, 2], name="feature_id"),
                                geometry=gpd.points_from_xy([0, 1, 1], [0, 1, 1]), crs="EPSG:4326")
    joint = pd.DataFrame(index=pd.MultiIndex.from_tuples([("a", 0), ("b", 1), ("b", 2)],
                                                         names=["region_id", "feature_id"]))
    counts = srai_counts(regions, features, joint)
    assert counts.to_dict(orient="index") == {"a": {"amenity_bank": 1, "cafe": 1}, "b": {"amenity_bank": 1, "cafe": 1}}


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("docs_example_srai_pipeline", EXAMPLES / "srai_pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        embedding = module.main()
        regions, _, _ = module.srai_frames()
    finally:
        sys.modules.pop(spec.name, None)
    assert embedding.index.equals(regions.index) and embedding.index.name == "region_id"
    assert embedding.shape == (len(regions), 4) and np.isfinite(embedding.to_numpy()).all()
    assert "urbanprofile's pca" in capsys.readouterr().out
