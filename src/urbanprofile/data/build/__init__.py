"""Build a dataset from raw geodata files: regionalize, load, join, aggregate, write (srai's verbs).

A city analyst brings region polygons (or only a boundary, cut into H3 cells), POI points with a
category, land-use polygons, trips and indicator values; :func:`build_dataset` turns them into a
built dataset folder (:mod:`urbanprofile.data.loaders.built`) that the registry discovers and every
embedder and protocol accepts. Each step is a public function that can be used on its own, in the module
of its concern: :mod:`~.spec` (what to build), :mod:`~.regions`, :mod:`~.points`, :mod:`~.join`,
:mod:`~.aggregate`, :mod:`~.trips`, :mod:`~.labels`, :mod:`~.osm`, :mod:`~.streaming` (files read in chunks),
:mod:`~.pipeline` (the whole build) and :mod:`~.distributed` (the joins as a partitioned job on a Dask cluster).
"""

from __future__ import annotations

from urbanprofile.data.build.aggregate import (
    landuse_shares,
    map_categories,
    poi_counts,
    read_landuse,
    record_poi_figures,
)
from urbanprofile.data.build.join import assign_points, check_points_inside, spatial_extension_path
from urbanprofile.data.build.labels import labels_for_regions
from urbanprofile.data.build.osm import OSM_CATEGORIES, OSM_LANDUSE_CLASSES, is_osm_extract
from urbanprofile.data.build.pipeline import UNITS, Joiner, build_city, build_dataset
from urbanprofile.data.build.points import PointTable, read_points
from urbanprofile.data.build.regions import (
    OVERLAP_ERROR,
    h3_cell_estimate,
    h3_regions,
    missing_ids,
    read_boundary,
    region_ids,
    region_overlaps,
    regions_from_file,
    repair_polygons,
)
from urbanprofile.data.build.spec import (
    DEFAULT_ENGINE,
    DEFAULT_MAX_CELLS,
    JOIN_ENGINES,
    LABEL_AGGREGATIONS,
    OTHER,
    BuildReport,
    BuildSpec,
    BuiltCity,
)
from urbanprofile.data.build.trips import (
    NO_TRIP_WEIGHT,
    TRIP_COORD_COLUMNS,
    TRIP_ID_COLUMNS,
    TRIP_TIME_COLUMNS,
    TRIP_WEIGHT_COLUMNS,
    od_from_trips,
    trip_columns,
    trip_weight_column,
)

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_MAX_CELLS",
    "JOIN_ENGINES",
    "LABEL_AGGREGATIONS",
    "NO_TRIP_WEIGHT",
    "OSM_CATEGORIES",
    "OSM_LANDUSE_CLASSES",
    "OTHER",
    "OVERLAP_ERROR",
    "TRIP_COORD_COLUMNS",
    "TRIP_ID_COLUMNS",
    "TRIP_TIME_COLUMNS",
    "TRIP_WEIGHT_COLUMNS",
    "UNITS",
    "BuildReport",
    "BuildSpec",
    "BuiltCity",
    "Joiner",
    "PointTable",
    "assign_points",
    "build_city",
    "build_dataset",
    "check_points_inside",
    "h3_cell_estimate",
    "h3_regions",
    "is_osm_extract",
    "labels_for_regions",
    "landuse_shares",
    "map_categories",
    "missing_ids",
    "od_from_trips",
    "poi_counts",
    "read_boundary",
    "read_landuse",
    "read_points",
    "record_poi_figures",
    "region_ids",
    "region_overlaps",
    "regions_from_file",
    "repair_polygons",
    "spatial_extension_path",
    "trip_columns",
    "trip_weight_column",
]
