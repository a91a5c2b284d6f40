"""Embeddings made anywhere: read a region-embedding file or frame, check it against a dataset, hash its content.

An embedding is a table with one row per region (a ``region_id`` index or column) and numeric columns. It is
checked before any evaluation: every region of the dataset present once, no region it lacks, numbers only,
no NaN; the first offending id or column is named in a one-line error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.io import first_line
from urbanprofile.errors import DataError

#: Where :meth:`CityData` embeddings written by ``urbanprofile embed`` record their dataset (parquet metadata).
DATASET_ATTR = "urbanprofile_dataset"
#: Formats an embedding file may have.
EMBEDDING_SUFFIXES = (".parquet", ".csv")


def file_hash(path: Path) -> str:
    """A short SHA-256 of a file's bytes (of a folder of part files: their names and bytes, in order): a changed
    file is a new result in the store."""
    from urbanprofile.data.embedding_parts import part_files

    digest = hashlib.sha256()
    for part in part_files(path) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(part.name.encode() + b"\x1f")
        with open(part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def frame_hash(frame: pd.DataFrame) -> str:
    """A short SHA-256 of a frame's ids, column names and values (row order included)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, frame.columns)).encode())
    digest.update("\x1f".join(map(str, frame.index)).encode())
    digest.update(np.ascontiguousarray(pd.util.hash_pandas_object(frame, index=True).to_numpy()).tobytes())
    return digest.hexdigest()[:16]


def read_embedding_file(path: str | Path) -> pd.DataFrame:
    """Read an embedding file (``.parquet`` or ``.csv``, or a folder of Parquet part files written by
    ``urbanprofile embed --out DIR/``) with its region ids as the index.

    The ids come from a ``region_id`` column, or from the index when a parquet file was written with one.
    A ``dataset`` column (CSV) or the parquet metadata written by ``urbanprofile embed`` says which dataset the
    embedding belongs to; it is kept in ``frame.attrs["urbanprofile_dataset"]``.

    Raises:
        DataError: The file is missing, of another format, unreadable, or has no region ids.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_parts(path)
    if suffix not in EMBEDDING_SUFFIXES:
        raise DataError(f"{path}: an embedding file must end in .parquet or .csv")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # readers raise many kinds of errors on a corrupt file
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({first_line(err)})") from None
    declared = frame.attrs.get(DATASET_ATTR)
    if "region_id" in frame.columns:
        frame = frame.set_index("region_id")
    elif frame.index.name != "region_id":
        raise DataError(f"{path}: no 'region_id' column (or index); columns: {', '.join(map(str, frame.columns))}")
    if "dataset" in frame.columns:
        names = frame["dataset"].dropna().astype(str).unique()
        if len(names) > 1:
            raise DataError(f"{path}: column 'dataset' names several datasets ({', '.join(names[:3])})")
        declared = names[0] if len(names) else declared
        frame = frame.drop(columns="dataset")
    frame.attrs = {DATASET_ATTR: declared} if declared else {}
    return frame


def _read_parts(folder: Path) -> pd.DataFrame:
    """A folder of part files as one frame, rows in part order."""
    from urbanprofile.data.embedding_parts import PART_GLOB, part_files

    parts = part_files(folder)
    if not parts:
        raise DataError(f"{folder}: a folder, but no embedding part files ({PART_GLOB}) in it")
    try:
        frames = [pd.read_parquet(part) for part in parts]
    except Exception as err:  # readers raise many kinds of errors on a corrupt file
        raise DataError(f"{folder}: a part file is not readable Parquet ({first_line(err)})") from None
    frame = pd.concat(frames) if len(frames) > 1 else frames[0]
    declared = {f.attrs.get(DATASET_ATTR) for f in frames}
    if len(declared) > 1:
        raise DataError(f"{folder}: part files name different datasets ({', '.join(map(str, declared))})")
    frame.attrs = {DATASET_ATTR: declared.pop()} if None not in declared else {}
    if frame.index.name != "region_id" and "region_id" in frame.columns:
        frame = frame.set_index("region_id")
    if frame.index.name != "region_id":
        raise DataError(f"{folder}: no 'region_id' column (or index) in its part files")
    return frame


def check_embedding(frame: pd.DataFrame, city: CityData, source: str) -> pd.DataFrame:
    """Check an embedding against a dataset and return it as floats in the dataset's region order.

    Ids are matched by their text, so ids read from a CSV as numbers still match string ids and vice versa.

    Args:
        frame: One row per region, indexed by region id (see :func:`read_embedding_file`).
        city: The dataset it is evaluated on.
        source: What to name in errors (the file path, or ``DataFrame 'name'``).

    Raises:
        DataError: It belongs to another dataset, an id is duplicated, missing or unknown, a column is not
            numeric or holds NaN or infinity, or there are no columns.
    """
    declared = frame.attrs.get(DATASET_ATTR)
    if declared and declared != city.name:
        raise DataError(f"{source}: an embedding of {declared!r}, not of {city.name!r}")
    ids = pd.Index(frame.index.map(str))
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"{source}: region id {duplicated[0]!r} appears more than once")
    city_ids = pd.Index(city.region_ids.map(str))
    extra = ids.difference(city_ids, sort=False)
    missing = city_ids.difference(ids, sort=False)
    if len(extra) and len(extra) == len(ids):
        raise DataError(f"{source}: no region id matches {city.name!r} (first id {ids[0]!r}; {city.name} has "
                        f"{city_ids[0]!r}, ...): an embedding of another dataset?")
    if len(extra):
        raise DataError(f"{source}: region id {extra[0]!r} is not a region of {city.name!r} "
                        f"({len(extra)} unknown ids)")
    if len(missing):
        raise DataError(f"{source}: region {missing[0]!r} of {city.name!r} has no row ({len(missing)} of "
                        f"{len(city_ids)} regions missing)")
    if frame.shape[1] == 0:
        raise DataError(f"{source}: no embedding columns besides region_id")
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            example = values.dropna().iloc[0] if values.notna().any() else None
            raise DataError(f"{source}: column {column!r} is not numeric (dtype {values.dtype}, e.g. {example!r})")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            where = frame.index[int(np.argmax(bad))]
            kind = "NaN" if pd.isna(values.iloc[int(np.argmax(bad))]) else "infinity"
            raise DataError(f"{source}: column {column!r} holds {kind} (region {str(where)!r}; {int(bad.sum())} rows)")
    positions = pd.Series(np.arange(len(ids)), index=ids)[city_ids].to_numpy()
    out = pd.DataFrame(frame.to_numpy(dtype=float)[positions], index=city.region_ids,
                       columns=[str(c) for c in frame.columns])
    out.index.name = "region_id"
    return out
