"""srai's embedders as urbanprofile methods (the reverse direction: :mod:`urbanprofile.interop.srai`).

srai (Spatial Representations for AI, Apache-2.0) describes a city with three frames: ``regions_gdf``
(indexed by ``region_id``), ``features_gdf`` (one row per mapped object, indexed by ``feature_id``, one
column per tag) and ``joint_gdf`` (which feature lies in which region, a ``(region_id, feature_id)``
index). Our ``poi_counts`` view is what srai's ``CountEmbedder`` makes of such frames, so the adapters
rebuild the frames from the counts (one feature per counted POI, in the ``category`` column) and hand
them to srai's own code; the reverse adapter counts srai's frames into a ``poi_counts`` view.

srai is imported only when a method is fitted, and only its embedders, neighbourhoods and the packages
they import are needed (``pip install 'urbanprofile[srai]'``, see docs/srai.md): nothing is downloaded
at run time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.errors import DataError, MethodUnavailableError, TrainingError

if TYPE_CHECKING:
    import geopandas as gpd

#: The column of the rebuilt ``features_gdf`` that holds each POI's category.
CATEGORY = "category"
#: The optional extra that installs srai and what its embedders import.
EXTRA = "srai"
#: Neighbours per region when regions have neither shared borders nor H3 cells (centroids only).
KNN_NEIGHBOURS = 6

#: The one view srai's count-based embedders read.
POI_VIEW = "poi_counts"


# -- what can run where ------------------------------------------------------------------------------
def _missing_package(name: str, torch: bool) -> str | None:
    packages = ["srai", "pytorch_lightning"] if torch else ["srai"]
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return f"{name} needs the {package!r} package: pip install 'urbanprofile[{EXTRA}]' (see docs/srai.md)"
    return None


def is_h3_city(city: CityData) -> bool:
    """Whether every region id is an H3 cell of one resolution (an H3 build)."""
    if importlib.util.find_spec("h3") is None or city.n_regions == 0:
        return False
    import h3

    ids = city.region_ids
    if not all(isinstance(r, str) and h3.is_valid_cell(r) for r in ids):
        return False
    return len({h3.get_resolution(r) for r in ids}) == 1


# -- our city as srai's three frames -------------------------------------------------------------------
def _region_points(city: CityData) -> gpd.GeoSeries:
    """One point per region (where its POIs are placed: the adapters only count them, never measure)."""
    import geopandas as gpd

    regions = city.regions
    if {"lon", "lat"} <= set(regions.columns) and city.has_locations:
        return gpd.GeoSeries(gpd.points_from_xy(regions["lon"], regions["lat"]), index=regions.index, crs="EPSG:4326")
    if "geometry" in regions and regions.geometry.notna().all():
        return regions.geometry.representative_point()
    return gpd.GeoSeries([None] * len(regions), index=regions.index, crs="EPSG:4326")


def city_to_srai(city: CityData, view: str = "poi_counts") -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame]:
    """srai's ``(regions_gdf, features_gdf, joint_gdf)`` rebuilt from a count view.

    Each counted object becomes one feature (``feature_id`` 0..total-1) whose ``category`` column holds
    the view's column name, placed at its region's centroid, so srai's ``CountEmbedder`` recovers the view
    exactly.

    Returns:
        ``regions_gdf`` (index ``region_id``, EPSG:4326), ``features_gdf`` (index ``feature_id``, column
        ``category``) and ``joint_gdf`` (index ``(region_id, feature_id)``, no columns).
    """
    import geopandas as gpd

    counts = city.view(view).reindex(city.region_ids)
    values = counts.to_numpy()
    if not np.allclose(values, np.round(values)):
        raise DataError(f"{city.name}: view {view!r} holds fractional values; srai's embedders count whole objects")
    values = np.round(values).astype(np.int64)
    region_pos, category_pos = np.nonzero(values)
    repeats = values[region_pos, category_pos]
    region_of = np.repeat(region_pos, repeats)
    category_of = np.repeat(category_pos, repeats)
    feature_ids = pd.Index(np.arange(region_of.size), name="feature_id")
    points = _region_points(city)
    names = np.array([str(c) for c in counts.columns], dtype=object)
    features = gpd.GeoDataFrame({CATEGORY: names[category_of]}, index=feature_ids,
                                geometry=points.to_numpy()[region_of], crs="EPSG:4326")
    regions = _gpd_regions(city)
    joint_index = pd.MultiIndex.from_arrays([city.region_ids.to_numpy()[region_of], feature_ids.to_numpy()],
                                            names=["region_id", "feature_id"])
    joint = pd.DataFrame(index=joint_index)
    return regions, features, joint


def _region_geometry(city: CityData) -> Any:
    regions = city.regions
    if "geometry" in regions and regions.geometry.notna().all():
        return regions.geometry.to_numpy()
    return _region_points(city).to_numpy()


def _expected_columns(city: CityData, view: str) -> list[str]:
    return [f"{CATEGORY}_{c}" for c in city.view(view).columns]


# -- neighbourhoods ------------------------------------------------------------------------------------
def city_neighbourhood(city: CityData) -> tuple[Any, str]:
    """A srai ``Neighbourhood`` over the city's regions, and where it came from in words.

    H3 builds get srai's ``H3Neighbourhood``; regions with known shared borders (``city.neighbors``) get
    those; other polygons get srai's ``AdjacencyNeighbourhood`` (touching geometries); centroids alone get
    the ``KNN_NEIGHBOURS`` nearest centroids, made symmetric.
    """
    from srai.neighbourhoods import AdjacencyNeighbourhood, H3Neighbourhood

    regions = _gpd_regions(city)
    if is_h3_city(city):
        return H3Neighbourhood(regions_gdf=regions), "H3 cells"
    if city.neighbors is not None and any(city.neighbors.values()):
        table = {r: set(city.neighbors.get(r, [])) - {r} for r in city.region_ids}
        return _table_neighbourhood(table), "shared borders (dataset)"
    geometry = city.regions.geometry if "geometry" in city.regions else None
    if geometry is not None and geometry.notna().all() and geometry.geom_type.isin(["Polygon", "MultiPolygon"]).all():
        return AdjacencyNeighbourhood(regions), "shared borders (geometry)"
    if not city.has_locations:
        raise MethodUnavailableError(f"{city.name}: regions have neither polygons, adjacency nor locations, "
                                     "so srai's neighbourhood embedders have no neighbours to read")
    from sklearn.neighbors import NearestNeighbors

    xy = city.coordinates_km()
    k = min(KNN_NEIGHBOURS, city.n_regions - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy)
    ids = city.region_ids
    table = {r: set() for r in ids}
    for i, row in enumerate(idx):
        for j in row[1:]:
            table[ids[i]].add(ids[j])
            table[ids[j]].add(ids[i])
    return _table_neighbourhood(table), f"{k} nearest centroids"


def _gpd_regions(city: CityData) -> gpd.GeoDataFrame:
    """srai's ``regions_gdf``: the regions' polygons (else centroids), indexed by ``region_id``."""
    import geopandas as gpd

    return gpd.GeoDataFrame(index=city.region_ids.rename("region_id"), geometry=_region_geometry(city),
                            crs="EPSG:4326")


def _table_neighbourhood(table: dict[Any, set[Any]]) -> Any:
    """A srai ``Neighbourhood`` answering from a region -> neighbours table."""
    from srai.neighbourhoods import Neighbourhood

    class TableNeighbourhood(Neighbourhood):
        def __init__(self, neighbours: dict[Any, set[Any]]) -> None:
            super().__init__(include_center=False)
            self.neighbours = neighbours

        def get_neighbours(self, index: Any, include_center: bool | None = None) -> set[Any]:
            found = set(self.neighbours.get(index, set()))
            centred: set[Any] = self._handle_center(index, 1, found, at_distance=False,
                                                    include_center_override=include_center)
            return centred

    return TableNeighbourhood(table)


def _integer_ids(city: CityData, regions: gpd.GeoDataFrame, joint: pd.DataFrame,
                 neighbourhood: Any = None) -> tuple[gpd.GeoDataFrame, pd.DataFrame, Any]:
    """srai's frames (and neighbourhood) with the regions numbered 0..N-1, where the city's ids are not integers.

    srai's neighbourhoods answer in Python sets, and hex2vec builds its training pairs by walking them: a set of
    strings (H3 cells) is walked in an order set by the interpreter's per-process string hashing, so the same seed
    trained another model in each process. Sets of integers filled in the same order are walked in the same order in
    every process.
    Integer ids are returned as they are (their results do not move).
    """
    ids = city.region_ids
    if pd.api.types.is_integer_dtype(ids.dtype):
        return regions, joint, neighbourhood
    numbered = regions.set_axis(pd.RangeIndex(len(ids), name=regions.index.name))
    joint_numbered = joint.set_axis(pd.MultiIndex.from_arrays(
        [ids.get_indexer(joint.index.get_level_values(0)), joint.index.get_level_values(1)], names=joint.index.names))
    if neighbourhood is not None:
        position = {r: k for k, r in enumerate(ids)}  # a dict: one lookup per neighbour of every region
        # Filled in sorted order: even a set of integers is walked in an order that depends on its insertions.
        table = {k: set(sorted(position[n] for n in neighbourhood.get_neighbours(r) if n in position and n != r))
                 for r, k in position.items()}
        neighbourhood = _table_neighbourhood(table)
    return numbered, joint_numbered, neighbourhood


# -- seeded, quiet, one-thread training ----------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep srai's progress bars and Lightning's banners and hints off the terminal.

    Our commands report their own progress; the outputs are checked for NaN instead of relying on warnings.
    """
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _seeded_training(random_state: int | None) -> Iterator[None]:
    """Seed torch and numpy's global generator (srai samples negatives from it), restore both after.

    Training runs on one thread: the cities are small, and extra threads only add synchronisation.
    """
    import torch

    seed = 0 if random_state is None else int(random_state)
    numpy_state = np.random.get_state()  # srai draws negatives from the global generator
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(seed)
            np.random.seed(seed)
            torch.set_num_threads(1)
            yield
    finally:
        torch.set_num_threads(threads)
        np.random.set_state(numpy_state)


def _trainer_kwargs(epochs: int) -> dict[str, Any]:
    # No logger and no checkpoints: Lightning would otherwise write lightning_logs/ into the working folder.
    return {"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


def _in_region_order(embedder: Any, log_counts: bool = False) -> Any:
    """Make a srai embedder read its counts in ``regions_gdf``'s order (and optionally as ``log1p``).

    srai's ``CountEmbedder`` joins with polars, whose joins do not keep row order, and hex2vec/geovex
    address regions by row position (negative sampling, the training batches): without this the same seed
    trains on a different pairing of rows each run.
    """
    counts = embedder._get_raw_counts

    def ordered(regions_gdf: pd.DataFrame, features_gdf: pd.DataFrame, joint_gdf: pd.DataFrame) -> pd.DataFrame:
        frame: pd.DataFrame = counts(regions_gdf, features_gdf, joint_gdf).reindex(regions_gdf.index)
        if log_counts:
            frame = pd.DataFrame(np.log1p(frame.to_numpy(dtype=np.float32)), index=frame.index, columns=frame.columns)
        return frame

    embedder._get_raw_counts = ordered
    return embedder


def _finite(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    values = frame.to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise TrainingError(f"{name}: the embedding holds non-finite values (training diverged); try fewer epochs "
                            "or a lower learning rate")
    return frame


# -- the methods ---------------------------------------------------------------------------------------
class _SraiEmbedder(Embedder):
    """Shared pieces of the srai adapters: availability, the rebuilt frames, the output convention."""

    columns_: list[str]
    #: Whether the srai embedder trains with torch / pytorch-lightning.
    uses_torch = False

    @classmethod
    def unavailable_reason(cls, name: str, city: CityData, **params: Any) -> str | None:
        """Why the method cannot run on ``city`` (one line), or ``None``."""
        return _missing_package(name, cls.uses_torch)

    def _frames(self, city: CityData) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, pd.DataFrame]:
        reason = self.unavailable_reason(type(self).__name__, city)
        if reason:
            raise MethodUnavailableError(reason)
        return city_to_srai(city)

    def _check_columns(self, city: CityData) -> None:
        columns = list(city.view("poi_counts").columns)
        if columns != self.columns_:
            raise DataError(f"{city.name}: poi_counts columns differ from the ones {type(self).__name__} was fitted "
                            f"on ({len(columns)} vs {len(self.columns_)} categories)")


class SraiCount(_SraiEmbedder):
    """srai's ``CountEmbedder``: the number of POIs of each category in a region.

    Equal to ``raw-poi`` by construction; it is here to show that the bridge loses nothing.
    """

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit(self, city: CityData) -> SraiCount:
        self.columns_ = list(city.view("poi_counts").columns)
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        from srai.embedders import CountEmbedder

        self._check_fitted("columns_")
        self._check_columns(city)
        regions, features, joint = self._frames(city)
        embedder = CountEmbedder(expected_output_features=_expected_columns(city, "poi_counts"),
                                 count_subcategories=True)
        with _quiet():
            counts = embedder.transform(regions, features, joint).reindex(city.region_ids)
        return as_embedding(counts.to_numpy(dtype=float), city.region_ids)


class SraiContextualCount(_SraiEmbedder):
    """srai's ``ContextualCountEmbedder``: a region's counts plus its neighbours' counts, ring by ring.

    Args:
        distance: Neighbour rings to read (1 = direct neighbours).
        concatenate: Keep each ring as its own block (else rings are averaged into the region's counts
            with weight ``1 / (ring + 1) ** 2``, srai's default).
        aggregation: How a ring's counts are aggregated (``average``, ``median``, ``sum``, ``min``, ``max``).
    """

    def __init__(self, distance: int = 2, concatenate: bool = True, aggregation: str = "average",
                 random_state: int | None = None) -> None:
        self.distance = distance
        self.concatenate = concatenate
        self.aggregation = aggregation
        self.random_state = random_state

    def fit(self, city: CityData) -> SraiContextualCount:
        if self.distance < 0:
            raise ValueError(f"distance must be >= 0, got {self.distance}")
        if self.aggregation not in ("average", "median", "sum", "min", "max"):
            raise ValueError(f"aggregation must be average, median, sum, min or max, got {self.aggregation!r}")
        self.columns_ = list(city.view("poi_counts").columns)
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        from srai.embedders import ContextualCountEmbedder

        self._check_fitted("columns_")
        self._check_columns(city)
        regions, features, joint = self._frames(city)
        neighbourhood, self.neighbourhood_source_ = city_neighbourhood(city)
        embedder = ContextualCountEmbedder(
            neighbourhood, self.distance, concatenate_vectors=self.concatenate,
            expected_output_features=_expected_columns(city, "poi_counts"), count_subcategories=True,
            aggregation_function=self.aggregation,  # type: ignore[arg-type]
            num_of_multiprocessing_workers=1)  # one process: the neighbourhood need not be pickled
        with _quiet():
            embedding = embedder.transform(regions, features, joint).reindex(city.region_ids)
        return as_embedding(embedding.to_numpy(dtype=float), city.region_ids)


class SraiHex2Vec(_SraiEmbedder):
    """srai's ``Hex2VecEmbedder``: an encoder of POI counts trained so that neighbours look alike.

    Positive pairs are neighbouring regions, negatives are regions more than ``negative_distance`` rings
    away (srai's skip-gram objective); the neighbourhood is :func:`city_neighbourhood`.

    Args:
        encoder_sizes: Hidden sizes; the last is the embedding size (srai's default ``[150, 75, 50]``).
        epochs: Training epochs (srai's default is 3; the cities here are small, so more are cheap).
        batch_size: Pairs per batch.
        lr: Adam learning rate.
        negative_distance: Negatives are sampled beyond this many rings (>= 2).
        log_counts: Feed ``log1p`` counts instead of srai's raw counts (off by default, to stay srai's
            method; on Chicago's dense POI counts the raw inputs train unstably, see docs/srai.md).
    """

    uses_torch = True

    def __init__(self, encoder_sizes: tuple[int, ...] = (150, 75, 50), epochs: int = 20, batch_size: int = 64,
                 lr: float = 1e-3, negative_distance: int = 2, log_counts: bool = False,
                 random_state: int | None = 0) -> None:
        self.encoder_sizes = encoder_sizes
        self.log_counts = log_counts
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.negative_distance = negative_distance
        self.random_state = random_state

    def fit(self, city: CityData) -> SraiHex2Vec:
        from srai.embedders import Hex2VecEmbedder

        if self.epochs < 1 or self.batch_size < 1 or self.negative_distance < 2:
            raise ValueError("epochs and batch_size must be >= 1 and negative_distance >= 2")
        regions, features, joint = self._frames(city)
        neighbourhood, self.neighbourhood_source_ = city_neighbourhood(city)
        _check_negatives(city, neighbourhood, self.negative_distance)
        regions, joint, neighbourhood = _integer_ids(city, regions, joint, neighbourhood)
        self.columns_ = list(city.view("poi_counts").columns)
        embedder = _in_region_order(Hex2VecEmbedder(encoder_sizes=list(self.encoder_sizes),
                                                    expected_output_features=_expected_columns(city, "poi_counts"),
                                                    count_subcategories=True), self.log_counts)
        with _seeded_training(self.random_state):
            embedder.fit(regions, features, joint, neighbourhood, negative_sample_k_distance=self.negative_distance,
                         batch_size=self.batch_size, learning_rate=self.lr,
                         trainer_kwargs=_trainer_kwargs(self.epochs))
        self.embedder_ = embedder
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("embedder_")
        self._check_columns(city)
        regions, features, joint = self._frames(city)
        regions, joint, _ = _integer_ids(city, regions, joint)
        with _seeded_training(self.random_state):
            embedding = self.embedder_.transform(regions, features, joint).reindex(regions.index)
        return _finite("hex2vec", as_embedding(embedding.to_numpy(dtype=float), city.region_ids))


def _check_negatives(city: CityData, neighbourhood: Any, distance: int) -> None:
    """srai samples negatives until one lies beyond ``distance`` rings: make sure one always exists."""
    everyone = set(city.region_ids)
    for region in city.region_ids:
        near = neighbourhood.get_neighbours_up_to_distance(region, distance, include_center=True)
        # Counting the city's regions among the near ones is O(rings) per region; the set difference with every
        # region was O(N), so O(N^2) in all: half of hex2vec's 23 minutes on 100,000 H3 cells.
        if len(everyone.intersection(near)) == len(everyone):
            raise MethodUnavailableError(
                f"{city.name}: region {region} has every other region within {distance} rings, so hex2vec has no "
                f"negative to sample ({city.n_regions} regions are too few)")


class SraiGeoVex(_SraiEmbedder):
    """srai's ``GeoVexEmbedder``: a hexagonal convolutional autoencoder of the counts around each H3 cell.

    It reads the ``radius`` rings of H3 cells around every region, so it runs on H3 builds only. Cells
    outside the build are treated as empty (no POIs), so every region gets an embedding.

    Args:
        radius: H3 rings read around each cell (>= 2).
        embedding_size: Embedding size.
        conv_layers: Convolutional layers (>= 2).
        conv_layer_size: Channels of the first convolution (capped at the number of POI categories, as
            srai requires).
        epochs: Training epochs.
        batch_size: Cells per batch.
        lr: Adam learning rate.
    """

    uses_torch = True

    def __init__(self, radius: int = 2, embedding_size: int = 32, conv_layers: int = 2, conv_layer_size: int = 32,
                 epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, random_state: int | None = 0) -> None:
        self.radius = radius
        self.embedding_size = embedding_size
        self.conv_layers = conv_layers
        self.conv_layer_size = conv_layer_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.random_state = random_state

    @classmethod
    def unavailable_reason(cls, name: str, city: CityData, **params: Any) -> str | None:
        missing = _missing_package(name, torch=True)
        if missing:
            return missing
        if not is_h3_city(city):
            return (f"{name} reads rings of H3 cells, and {city.name}'s regions are not H3 cells "
                    "(build the city with --boundary and --h3-res)")
        return None

    def fit(self, city: CityData) -> SraiGeoVex:
        from srai.embedders import GeoVexEmbedder
        from srai.neighbourhoods import H3Neighbourhood

        if self.radius < 2 or self.conv_layers < 2 or min(self.epochs, self.batch_size, self.embedding_size) < 1:
            raise ValueError("radius and conv_layers must be >= 2; epochs, batch_size and embedding_size >= 1")
        padded = self._padded(city)
        regions, features, joint = self._frames(padded)
        self.columns_ = list(city.view("poi_counts").columns)
        columns = _expected_columns(city, "poi_counts")
        embedder = _in_region_order(GeoVexEmbedder(
            target_features=columns, count_subcategories=True, batch_size=self.batch_size,
            neighbourhood_radius=self.radius, convolutional_layers=self.conv_layers, embedding_size=self.embedding_size,
            convolutional_layer_size=min(self.conv_layer_size, len(columns))))
        with _seeded_training(self.random_state):
            embedder.fit(regions, features, joint, H3Neighbourhood(regions_gdf=regions), learning_rate=self.lr,
                         trainer_kwargs=_trainer_kwargs(self.epochs))
        self.embedder_ = embedder
        return self

    def transform(self, city: CityData) -> pd.DataFrame:
        self._check_fitted("embedder_")
        self._check_columns(city)
        regions, features, joint = self._frames(self._padded(city))
        with _seeded_training(self.random_state):
            assert self.embedder_._model is not None
            self.embedder_._model.eval()  # batch statistics must not depend on which cells share a batch
            embedding = self.embedder_.transform(regions, features, joint)
        missing = city.region_ids.difference(embedding.index)
        if len(missing):
            raise TrainingError(f"geovex: no embedding for H3 cell {missing[0]} (its rings are incomplete)")
        embedding = embedding.reindex(city.region_ids)
        return _finite("geovex", as_embedding(embedding.to_numpy(dtype=float), city.region_ids))

    def _padded(self, city: CityData) -> CityData:
        """The city plus the empty H3 cells within ``radius`` rings of it (srai wants every ring complete)."""
        import geopandas as gpd
        import h3
        from shapely.geometry import Polygon

        reason = self.unavailable_reason("geovex", city)
        if reason:
            raise MethodUnavailableError(reason)
        ids = list(city.region_ids)
        extra = sorted({c for cell in ids for c in h3.grid_disk(cell, self.radius)} - set(ids))
        all_ids = pd.Index(ids + extra, name="region_id")
        polygons = [Polygon([(lng, lat) for lat, lng in h3.cell_to_boundary(c)]) for c in all_ids]
        centres = np.array([h3.cell_to_latlng(c) for c in all_ids])
        regions = gpd.GeoDataFrame({"lon": centres[:, 1], "lat": centres[:, 0]}, index=all_ids, geometry=polygons,
                                   crs="EPSG:4326")
        counts = city.view("poi_counts").reindex(all_ids, fill_value=0)
        return CityData(name=city.name, regions=regions, views={"poi_counts": counts}, meta=dict(city.meta))


# -- ours, called the srai way -------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (so messages read 9999, not np.int64(9999))."""
    return value.item() if isinstance(value, np.generic) else value


def srai_counts(regions_gdf: pd.DataFrame, features_gdf: pd.DataFrame, joint_gdf: pd.DataFrame) -> pd.DataFrame:
    """Count srai's frames into a ``poi_counts`` view, as srai's ``CountEmbedder`` does.

    Every non-geometry column of ``features_gdf`` is a tag; each (tag, value) pair becomes a category
    ``<tag>_<value>`` and a region's count is the number of its joined features with that value (missing
    values are not counted; a boolean tag is one category, counted where it is True).

    Raises:
        DataError: Unnamed indexes, a ``joint_gdf`` that is not a ``(region_id, feature_id)`` index, or
            joint rows naming regions or features that the other frames lack.
    """
    for frame, what in ((regions_gdf, "regions_gdf"), (features_gdf, "features_gdf")):
        if frame.index.name is None:
            raise DataError(f"{what} must have a named index (srai: region_id / feature_id)")
    if not isinstance(joint_gdf.index, pd.MultiIndex) or joint_gdf.index.nlevels != 2:
        raise DataError("joint_gdf must be indexed by (region_id, feature_id), a 2-level MultiIndex")
    if regions_gdf.index.has_duplicates:
        first = regions_gdf.index[regions_gdf.index.duplicated()][0]
        raise DataError(f"regions_gdf has duplicate index values, e.g. {_plain(first)!r}")
    region_of = joint_gdf.index.get_level_values(0)
    feature_of = joint_gdf.index.get_level_values(1)
    stray = ~region_of.isin(regions_gdf.index)
    if stray.any():
        raise DataError(f"joint_gdf names region {_plain(region_of[stray][0])!r}, which regions_gdf lacks")
    unknown = ~feature_of.isin(features_gdf.index)
    if unknown.any():
        raise DataError(f"joint_gdf names feature {_plain(feature_of[unknown][0])!r}, which features_gdf lacks")
    tags = features_gdf.drop(columns=[c for c in ("geometry",) if c in features_gdf.columns])
    if tags.shape[1] == 0:
        raise DataError("features_gdf has no tag columns to count (only geometry)")
    flags = [c for c in tags.columns if pd.api.types.is_bool_dtype(tags[c])]
    # A boolean tag (srai's grouped filters) counts where it is True; any other tag counts per value.
    dummies = pd.concat([pd.get_dummies(tags.drop(columns=flags).astype("string"), prefix_sep="_", dtype=np.int64),
                         tags[flags].astype(np.int64)], axis=1)
    joined = dummies.reindex(feature_of).to_numpy()
    counts = pd.DataFrame(joined, columns=dummies.columns).groupby(np.asarray(region_of)).sum()
    counts = counts.reindex(regions_gdf.index, fill_value=0)
    counts.index.name = "region_id"
    return counts.sort_index(axis=1)


def srai_city(regions_gdf: gpd.GeoDataFrame, features_gdf: pd.DataFrame, joint_gdf: pd.DataFrame,
              name: str = "srai-regions", columns: list[str] | None = None) -> CityData:
    """A :class:`CityData` with a ``poi_counts`` view counted from srai's frames.

    Args:
        regions_gdf: Regions (any CRS; reprojected to EPSG:4326), indexed by region id.
        features_gdf: Features with tag columns, indexed by feature id.
        joint_gdf: Which feature lies in which region.
        name: Name of the city in messages.
        columns: Categories to keep, in order (missing ones are zeros), e.g. the ones seen in ``fit``.
    """
    import geopandas as gpd

    if not isinstance(regions_gdf, gpd.GeoDataFrame) or regions_gdf.geometry.name not in regions_gdf.columns:
        raise DataError("regions_gdf holds no geometry (srai's regions are a GeoDataFrame of polygons)")
    counts = srai_counts(regions_gdf, features_gdf, joint_gdf)
    if columns is not None:
        counts = counts.reindex(columns=columns, fill_value=0)
    regions = gpd.GeoDataFrame(regions_gdf[[]].copy(), geometry=gpd.GeoSeries(regions_gdf.geometry).to_numpy(),
                               crs=regions_gdf.crs)
    if regions.crs is None:
        raise DataError("regions_gdf has no CRS (srai's regions are EPSG:4326)")
    regions = regions.to_crs("EPSG:4326")
    regions.index.name = "region_id"
    if regions.geometry.notna().all():
        projected = regions.geometry.to_crs(regions.estimate_utm_crs())
        centres = projected.centroid.to_crs("EPSG:4326")  # centroids in metres, not degrees
        regions["lon"], regions["lat"] = centres.x.to_numpy(), centres.y.to_numpy()
    counts.index = regions.index
    return CityData(name=name, regions=regions, views={"poi_counts": counts}).validate()


__all__ = ["SraiContextualCount", "SraiCount", "SraiGeoVex", "SraiHex2Vec", "city_neighbourhood",
           "city_to_srai", "is_h3_city", "srai_city", "srai_counts"]
