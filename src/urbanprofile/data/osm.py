"""OpenStreetMap extracts (``.osm.pbf``, read with pyrosm): POIs with a broad category, land use, extent."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from urbanprofile.data.io import first_line
from urbanprofile.errors import DataError, require

if TYPE_CHECKING:
    import geopandas as gpd

#: OSM keys that make a feature a POI, in the order their value names the POI's raw category.
POI_KEYS = ("amenity", "shop", "tourism", "leisure", "office", "craft", "healthcare", "historic")

#: Broad POI categories from OSM tags (``key=value``; ``key=*`` matches any value of that key).
#: Tags not listed here count as ``other``.
OSM_CATEGORIES: dict[str, list[str]] = {
    "food": ["amenity=restaurant", "amenity=cafe", "amenity=fast_food", "amenity=food_court",
             "amenity=ice_cream", "amenity=bakery"],
    "nightlife": ["amenity=bar", "amenity=pub", "amenity=nightclub", "amenity=biergarten"],
    "shopping": ["shop=*", "amenity=marketplace"],
    "education": ["amenity=school", "amenity=university", "amenity=college", "amenity=kindergarten",
                  "amenity=library", "amenity=childcare", "amenity=language_school"],
    "health": ["amenity=hospital", "amenity=clinic", "amenity=doctors", "amenity=dentist", "amenity=pharmacy",
               "healthcare=*"],
    "finance": ["amenity=bank", "amenity=atm", "amenity=bureau_de_change", "amenity=money_transfer"],
    "transport": ["amenity=parking", "amenity=bicycle_parking", "amenity=fuel", "amenity=bus_station",
                  "amenity=taxi", "amenity=car_rental", "amenity=bicycle_rental", "amenity=charging_station",
                  "amenity=car_sharing", "amenity=parking_entrance", "amenity=ferry_terminal"],
    "culture": ["amenity=theatre", "amenity=cinema", "amenity=arts_centre", "tourism=museum",
                "tourism=gallery", "tourism=artwork", "historic=*"],
    "tourism": ["tourism=*"],
    "leisure": ["leisure=*"],
    "public_service": ["amenity=police", "amenity=post_office", "amenity=townhall", "amenity=courthouse",
                       "amenity=fire_station", "amenity=community_centre", "amenity=social_facility",
                       "amenity=public_building", "amenity=embassy"],
    "religion": ["amenity=place_of_worship"],
    "office": ["office=*"],
    "craft": ["craft=*"],
    "street_furniture": ["amenity=bench", "amenity=waste_basket", "amenity=drinking_water", "amenity=toilets",
                         "amenity=vending_machine", "amenity=recycling", "amenity=telephone",
                         "amenity=post_box", "amenity=clock", "amenity=fountain"],
}


def is_osm_extract(path: Path) -> bool:
    return path.name.lower().endswith(".osm.pbf")


def _open(path: Path) -> object:
    pyrosm = require("pyrosm", "build")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return pyrosm.OSM(str(path))
    except Exception as err:  # pyrosm raises many types for a corrupt extract
        raise DataError(f"{path}: cannot read OSM extract ({first_line(err)})") from None


def _nonempty(path: Path, frame: gpd.GeoDataFrame | None, what: str) -> gpd.GeoDataFrame:
    if frame is None or len(frame) == 0:
        raise DataError(f"{path}: the OSM extract holds no {what}")
    return frame.set_crs("EPSG:4326", allow_override=True)


def read_osm_pois(path: Path) -> gpd.GeoDataFrame:
    """POIs of an OSM extract as points, with a ``category`` column holding the raw ``key=value`` tag.

    Ways and relations (a shop drawn as a building) become their representative point.
    """
    osm = _open(path)
    pois = _nonempty(path, osm.get_pois(), "POIs")  # type: ignore[attr-defined]
    raw = pd.Series(pd.NA, index=pois.index, dtype=object)
    for key in reversed(POI_KEYS):  # the first key in POI_KEYS wins
        if key in pois.columns:
            value = pois[key]
            has = value.notna() & (value.astype(str).str.len() > 0)
            raw[has] = key + "=" + value[has].astype(str)
    points = pois.geometry.where(pois.geometry.geom_type == "Point", pois.geometry.representative_point())
    return pois.assign(category=raw.to_numpy(), geometry=points)[["category", "geometry"]]


def read_osm_landuse(path: Path) -> gpd.GeoDataFrame:
    """Land-use polygons of an OSM extract, with their ``landuse`` tag as the ``class`` column."""
    osm = _open(path)
    landuse = _nonempty(path, osm.get_landuse(), "land-use polygons")  # type: ignore[attr-defined]
    landuse = landuse[landuse.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    return landuse.assign(**{"class": landuse["landuse"].astype(str)})[["class", "geometry"]]


def osm_extent(path: Path) -> gpd.GeoDataFrame:
    """The extent of an OSM extract: the bounding box its header declares, else the bounds of its POIs."""
    import geopandas as gpd
    from shapely.geometry import box

    osm = _open(path)
    extent = getattr(osm, "_data_bounding_box", None)  # pyrosm keeps the header bbox here
    if extent is None or getattr(extent, "is_empty", True):
        extent = box(*read_osm_pois(path).total_bounds)
    return gpd.GeoDataFrame(geometry=[extent], crs="EPSG:4326")
