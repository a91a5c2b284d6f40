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


#: Land-use classes from OSM tags (``key=value``): ``landuse=*`` values, plus the ``leisure``, ``natural`` and
#: ``amenity`` values that describe how an area is used. A multi-valued tag (``landuse=grass;parking``) takes the
#: first value that maps. Tags that are not land use (``landuse=road``, ``steps``, ``lane``, ``bus_stop``: highway
#: values put under the wrong key) and tags not listed here are dropped, and counted.
OSM_LANDUSE_CLASSES: dict[str, list[str]] = {
    "residential": ["landuse=residential", "landuse=housing", "landuse=apartments", "landuse=garages"],
    "commercial": ["landuse=commercial", "landuse=office", "landuse=retail", "landuse=shops"],
    "industrial": ["landuse=industrial", "landuse=port", "landuse=depot", "landuse=warehouse", "landuse=quarry",
                   "landuse=landfill", "landuse=brownfield"],
    "institutional": ["landuse=institutional", "landuse=education", "landuse=civic", "landuse=civil",
                      "landuse=religious", "landuse=health", "landuse=public_administration",
                      "amenity=school", "amenity=university", "amenity=college", "amenity=kindergarten",
                      "amenity=hospital", "amenity=clinic", "amenity=place_of_worship", "amenity=townhall"],
    "military": ["landuse=military"],
    "transport": ["landuse=railway", "landuse=highway_area", "landuse=parking", "landuse=transportation",
                  "landuse=airport", "amenity=parking", "amenity=bus_station", "amenity=ferry_terminal"],
    "construction": ["landuse=construction", "landuse=greenfield"],
    "recreation": ["landuse=recreation_ground", "landuse=winter_sports", "leisure=park", "leisure=pitch",
                   "leisure=playground", "leisure=sports_centre", "leisure=stadium", "leisure=golf_course",
                   "leisure=garden", "leisure=common", "leisure=dog_park", "leisure=track"],
    "green": ["landuse=grass", "landuse=village_green", "landuse=greenery", "landuse=flowerbed",
              "landuse=plant_nursery", "natural=grassland", "natural=scrub", "natural=heath"],
    "forest": ["landuse=forest", "natural=wood"],
    "agriculture": ["landuse=farmland", "landuse=farmyard", "landuse=meadow", "landuse=orchard",
                    "landuse=vineyard", "landuse=allotments", "landuse=greenhouse_horticulture",
                    "landuse=aquaculture", "landuse=animal_keeping"],
    "water": ["landuse=basin", "landuse=reservoir", "landuse=pond", "landuse=salt_pond", "natural=water",
              "natural=wetland", "natural=bay"],
    "cemetery": ["landuse=cemetery", "amenity=grave_yard"],
}
#: Tag keys besides ``landuse`` that :data:`OSM_LANDUSE_CLASSES` reads.
_LANDUSE_EXTRA_KEYS = ("leisure", "natural", "amenity")
_LANDUSE_LOOKUP = {tag: cls for cls, tags in OSM_LANDUSE_CLASSES.items() for tag in tags}


def landuse_classes(raw: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Map raw OSM tags (``landuse=lane;parking``) onto :data:`OSM_LANDUSE_CLASSES`.

    Returns:
        The class per feature (missing where no value maps) and the raw tags that were dropped, with counts
        (most frequent first).
    """
    def one(tag: object) -> str | None:
        key, _, values = str(tag).partition("=")
        for value in values.split(";"):
            found = _LANDUSE_LOOKUP.get(f"{key.strip()}={value.strip().lower()}")
            if found is not None:
                return found
        return None

    classes = raw.map(one)
    dropped = raw[classes.isna()].astype(str).value_counts()
    return classes, {str(k): int(v) for k, v in dropped.items()}


def is_osm_extract(path: Path) -> bool:
    return path.name.lower().endswith(".osm.pbf")


#: The largest block header the PBF format allows (64 KiB).
_MAX_BLOB_HEADER = 64 * 1024


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if not byte & 0x80:
            return value, at


def _blob_header(data: bytes) -> tuple[bytes, int]:
    """The ``type`` and ``datasize`` of a PBF BlobHeader (a small protobuf message)."""
    kind, size, at = b"", -1, 0
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            if field == 3:
                size = value
        elif wire == 2:
            length, at = _varint(data, at)
            if field == 1:
                kind = data[at:at + length]
            at += length
        else:
            raise ValueError(f"wire type {wire}")
    if size < 0 or at != len(data):
        raise ValueError("no datasize")
    return kind, size


def check_pbf(path: Path) -> None:
    """Walk the block framing of an OSM PBF file (headers only, seeking over the data), so that a file that is not
    PBF or is cut short is an error before a reader silently returns part of it.

    Raises:
        DataError: The file is not OSM PBF, or ends inside a block (truncated).
    """
    size = path.stat().st_size
    offset = blocks = 0
    with path.open("rb") as handle:
        while offset < size:
            head = handle.read(4)
            length = int.from_bytes(head, "big") if len(head) == 4 else -1
            if blocks == 0 and not 0 < length <= _MAX_BLOB_HEADER:
                raise DataError(f"{path}: not an OSM PBF file (it does not start with a PBF block header)")
            header = handle.read(max(length, 0))
            if length < 0 or len(header) < length:
                raise DataError(f"{path}: truncated OSM PBF file (it ends inside block {blocks + 1}, at byte {size:,})")
            try:
                kind, datasize = _blob_header(header)
            except ValueError:
                raise DataError(f"{path}: not an OSM PBF file (block {blocks + 1} has no valid header)") from None
            if blocks == 0 and kind != b"OSMHeader":
                raise DataError(f"{path}: not an OSM PBF file (its first block is {kind[:20]!r}, not OSMHeader)")
            offset += 4 + length + datasize
            if offset > size:
                raise DataError(f"{path}: truncated OSM PBF file (block {blocks + 1} needs {offset:,} bytes, the file "
                                f"has {size:,})")
            handle.seek(offset)
            blocks += 1
    if blocks == 0:
        raise DataError(f"{path}: not an OSM PBF file (it is empty)")


def _open(path: Path) -> object:
    pyrosm = require("pyrosm", "build")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    check_pbf(path)
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


def read_osm_landuse(path: Path) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """Land-use polygons of an OSM extract, classed by :data:`OSM_LANDUSE_CLASSES` in the ``class`` column.

    Returns:
        The polygons of a known class, and the raw tags dropped (not land use, or not in the mapping) with counts.
    """
    osm = _open(path)
    landuse = osm.get_landuse()  # type: ignore[attr-defined]
    wanted: dict[str, list[str]] = {key: [] for key in _LANDUSE_EXTRA_KEYS}
    for tag in _LANDUSE_LOOKUP:
        key, _, value = tag.partition("=")
        if key in wanted:
            wanted[key].append(value)
    extra = osm.get_data_by_custom_criteria(  # type: ignore[attr-defined]
        custom_filter=wanted, osm_keys_to_keep=list(wanted), filter_type="keep", keep_nodes=False)
    parts = []
    for frame, keys in ((landuse, ("landuse",)), (extra, _LANDUSE_EXTRA_KEYS)):
        if frame is None or len(frame) == 0:
            continue
        frame = frame[frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
        raw = pd.Series(pd.NA, index=frame.index, dtype=object)
        for key in reversed(keys):  # the first key wins
            if key in frame.columns:
                has = frame[key].notna() & (frame[key].astype(str).str.len() > 0)
                raw[has] = key + "=" + frame.loc[has, key].astype(str)
        parts.append(frame.assign(raw=raw)[raw.notna()][["raw", "geometry"]])
    if not parts:
        raise DataError(f"{path}: the OSM extract holds no land-use polygons")
    polygons = pd.concat(parts, ignore_index=True)
    classes, dropped = landuse_classes(polygons["raw"])
    kept = polygons.assign(**{"class": classes})[classes.notna()][["class", "geometry"]]
    if kept.empty:
        raise DataError(f"{path}: none of the OSM extract's land-use tags maps to a land-use class "
                        f"(found: {', '.join(list(dropped)[:5])})")
    return _nonempty(path, kept, "land-use polygons"), dropped


def osm_extent(path: Path) -> gpd.GeoDataFrame:
    """The extent of an OSM extract: the bounding box its header declares, else the bounds of its POIs."""
    import geopandas as gpd
    from shapely.geometry import box

    osm = _open(path)
    extent = getattr(osm, "_data_bounding_box", None)  # pyrosm keeps the header bbox here
    if extent is None or getattr(extent, "is_empty", True):
        extent = box(*read_osm_pois(path).total_bounds)
    return gpd.GeoDataFrame(geometry=[extent], crs="EPSG:4326")
