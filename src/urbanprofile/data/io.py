"""Readers for untrusted data files that fail with one line naming the file and what is wrong, and an
atomic writer (nothing half-written)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from urbanprofile.errors import DataError

if TYPE_CHECKING:
    import geopandas as gpd


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (readers of corrupt files raise long, many-line ones)."""
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


#: File suffixes read as plain tables.
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
#: Cell values read as missing in text tables (compared lower-case, stripped).
NA_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "#n/a", "<na>", "-"})
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


#: The first bytes of every ``.npy`` file.
NPY_MAGIC = b"\x93NUMPY"


def load_npy(path: Path, ndim: int | None = None, shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Load a ``.npy`` array without pickle and check its rank and shape.

    Args:
        path: The file.
        ndim: Required number of dimensions.
        shape: Required shape; ``None`` entries match any length.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as handle:
        head = handle.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        # numpy reads anything without the magic as a pickle and then refuses it, which misleads the user.
        start = head.decode("ascii", errors="replace")
        raise DataError(f"{path}: not a .npy file (it starts with {start!r}, not the .npy header; "
                        "a CSV or text file renamed?)")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(f"{path}: holds an object array that needs pickle; refused (store numbers)") from None
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy file ({err})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a single array, got {type(array).__name__}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected numbers, got dtype {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-D array, got shape {array.shape}")
    if shape is not None and (
        len(shape) != array.ndim or any(s is not None and s != a for s, a in zip(shape, array.shape, strict=True))
    ):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise DataError(f"{path}: wrong shape {array.shape}, expected {want}")
    return array


def load_json(path: Path) -> Any:
    """Load a JSON file, naming it on failure."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def read_table(path: Path) -> pd.DataFrame:
    """A plain CSV or Parquet table (untrusted: no pickle, named on failure)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in TABLE_SUFFIXES:
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", low_memory=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except Exception as err:  # pandas and pyarrow raise many types for a corrupt file
        raise DataError(f"{path}: cannot read table ({first_line(err)})") from None
    raise DataError(f"{path}: unsupported table format {suffix!r} (use .csv or .parquet)")


def read_vector(path: Path, crs: str | None = None) -> gpd.GeoDataFrame:
    """Read a vector file (shapefile, GeoPackage, GeoJSON, GeoParquet) into EPSG:4326.

    Args:
        path: The file.
        crs: CRS to assume when the file declares none; without it such a file is an error.

    Raises:
        DataError: The file is unreadable, a plain table, has no usable CRS, or its coordinates are not
            degrees although its CRS says they are (a projected file labelled EPSG:4326).
    """
    import geopandas as gpd

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() in TABLE_SUFFIXES:
        raise DataError(f"{path}: a plain table, not a vector file; give polygons as GeoPackage, GeoJSON, "
                        "shapefile or GeoParquet")
    try:
        frame = gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path, engine="pyogrio")
    except Exception as err:  # the GIS readers raise many types for a corrupt file
        raise DataError(f"{path}: cannot read vector data ({first_line(err)})") from None
    try:
        has_geometry = isinstance(frame, gpd.GeoDataFrame) and frame.geometry.name in frame.columns
    except AttributeError:  # a GeoDataFrame without an active geometry column
        has_geometry = False
    if not has_geometry:
        raise DataError(f"{path}: holds no geometry (a table without shapes)")
    return vector_in_degrees(frame, path, crs)


def vector_in_degrees(frame: gpd.GeoDataFrame, path: Path, crs: str | None = None) -> gpd.GeoDataFrame:
    """Features of ``path`` (all, or one chunk read on its own) reprojected to EPSG:4326 and checked to be degrees.

    Raises:
        DataError: The features have no CRS and no ``crs`` is given, the CRS is unknown, or the coordinates are not
            lon/lat degrees after reprojecting.
    """
    from pyproj.exceptions import CRSError

    assumed = frame.crs is None
    try:
        if frame.crs is None:
            if crs is None:
                raise DataError(f"{path}: has no CRS (no .prj); pass the CRS it is in (e.g. --crs EPSG:4326)")
            frame = frame.set_crs(crs)
        if not frame.crs.equals("EPSG:4326"):
            frame = frame.to_crs("EPSG:4326")
    except CRSError as err:
        raise DataError(f"{path}: CRS {crs or frame.crs}: not a CRS pyproj knows ({first_line(err)})") from None
    shapes = frame.geometry[frame.geometry.notna() & ~frame.geometry.is_empty]
    bounds = shapes.total_bounds if len(shapes) else np.zeros(4)
    if not np.isfinite(bounds).all() or np.abs(bounds[[0, 2]]).max() > 180 or np.abs(bounds[[1, 3]]).max() > 90:
        # A projected file labelled (or reprojected as) degrees; the UTM estimate would fail later with a riddle.
        declared = "the --crs given" if assumed else "its declared CRS"
        raise DataError(f"{path}: coordinates ({bounds[0]:.6g}, {bounds[1]:.6g} .. {bounds[2]:.6g}, {bounds[3]:.6g}) "
                        f"are not lon/lat degrees after reading with {declared}; the file's CRS is wrong "
                        "(fix its .prj, or pass the CRS it is really in)")
    return frame


@dataclass
class RawTable:
    """A table read without guessing types: every CSV cell is text, so ids keep leading zeros and values that
    are not numbers can be named with their line.

    Attributes:
        path: The file.
        frame: The rows (CSV: text cells; Parquet: the stored types).
        lines: The file line (CSV) or row number (Parquet) of each row, for messages.
        malformed: Lines of CSV rows with the wrong number of fields (left out of ``frame``).
    """

    path: Path
    frame: pd.DataFrame
    lines: np.ndarray
    malformed: list[int] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return self.path.suffix.lower() in TABLE_SUFFIXES

    def where(self, row: int) -> str:
        """``<file> line N`` (CSV) or ``<file> row N`` (Parquet) for row position ``row``."""
        return f"{self.path} {'line' if self.is_text else 'row'} {int(self.lines[row])}"


def _record_fields(path: Path, delimiter: str) -> tuple[int, np.ndarray, np.ndarray]:
    """Fields in the header, and the line and field count of every non-blank record after it."""
    data = path.read_bytes()
    if b'"' not in data:  # no quoting: records are lines, counted with numpy (a CSV of millions of POIs)
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.append(np.flatnonzero(buf == ord("\n")), len(buf))
        starts = np.concatenate([[0], ends[:-1] + 1])
        carriage = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")) if len(buf) else ends > starts
        fields = np.bincount(np.searchsorted(ends, np.flatnonzero(buf == ord(delimiter))),
                             minlength=len(ends)) + 1
        blank = (ends - starts - carriage) == 0
        numbers = np.arange(1, len(ends) + 1)
        if not len(ends) or blank[0]:
            raise DataError(f"{path}: empty file (no header line)")
        rest = ~blank
        rest[0] = False
        return int(fields[0]), numbers[rest], fields[rest]
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (no header line)")
        lines: list[int] = []
        counts: list[int] = []
        start = reader.line_num + 1
        for record in reader:
            if record:  # pandas skips blank lines too
                lines.append(start)
                counts.append(len(record))
            start = reader.line_num + 1
    return len(header), np.asarray(lines, dtype=np.int64), np.asarray(counts, dtype=np.int64)


def read_raw_table(path: Path) -> RawTable:
    """A CSV (every cell as text, rows with the wrong number of fields counted and left out) or Parquet table."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        frame = read_table(path)
        return RawTable(path, frame, np.arange(1, len(frame) + 1))
    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        n_header, lines, counts = _record_fields(path, delimiter)
        frame = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except DataError:
        raise
    except Exception as err:  # csv, pandas and decoding raise many types for a corrupt file
        raise DataError(f"{path}: cannot read table ({first_line(err)})") from None
    long = counts > n_header
    skipped = lines[long].tolist()  # pandas left these out
    lines, counts = lines[~long], counts[~long]
    if len(frame) != len(lines):  # the two readers disagree on the records; trust neither line number
        raise DataError(f"{path}: cannot read table (inconsistent quoting or line breaks inside fields)")
    keep = counts == n_header
    malformed = sorted([*lines[~keep].tolist(), *skipped])
    return RawTable(path, frame[keep].reset_index(drop=True), lines[keep], malformed)


def parse_numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numbers from a column that may be text.

    Returns:
        The values as floats (NaN where missing or unreadable), a mask of missing cells (empty or an
        :data:`NA_TOKENS` token) and a mask of cells that are present but not numbers.
    """
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        return numbers, np.isnan(numbers), np.zeros(len(values), dtype=bool)
    numbers = np.array(pd.to_numeric(values, errors="coerce").to_numpy(dtype=float, na_value=np.nan))
    missing = np.zeros(len(values), dtype=bool)
    check = np.flatnonzero(np.isnan(numbers))  # only cells that did not parse at once need a closer look
    if len(check):
        text = values.iloc[check].astype(object).where(values.iloc[check].notna(), "").astype(str).str.strip()
        missing[check] = text.str.lower().isin(NA_TOKENS).to_numpy()
        numbers[check] = pd.to_numeric(text.where(~missing[check]), errors="coerce").to_numpy(dtype=float,
                                                                                            na_value=np.nan)
    return numbers, missing, ~missing & np.isnan(numbers)


def not_a_number(value: object) -> str:
    """Why a cell is not a number, for messages (a decimal comma gets its own hint)."""
    text = str(value).strip()
    if _DECIMAL_COMMA.match(text):
        return f"{text!r} is not a number (a decimal comma or thousands separator? write it with '.')"
    return f"{text!r} is not a number"


def centroid_lonlat(geoms: gpd.GeoSeries) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of EPSG:4326 polygons, computed in the local UTM zone, as lon/lat degrees."""
    utm = geoms.estimate_utm_crs()
    centroids = geoms.to_crs(utm).centroid.to_crs("EPSG:4326")
    return centroids.x.to_numpy(), centroids.y.to_numpy()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write beside the target and move into place, so a failure leaves no partial file.

    Args:
        path: The target file.
        write: Writes the content to the temporary path it is given.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def building_folder(target: Path) -> Path:
    """A new, empty folder beside ``target`` to build it in (then :func:`replace_folder`), with the permissions of
    a folder the user makes (``mkdtemp`` makes it private; a dataset folder should not be)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_folder(tmp: Path, target: Path) -> None:
    """Rename a finished folder ``tmp`` over ``target``; an old target is set aside first and removed only once
    the new folder is in place (put back if the rename fails), so a failure never loses the old one."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "previous")
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old / "previous", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
