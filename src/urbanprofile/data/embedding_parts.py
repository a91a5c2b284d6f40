"""Writing region embeddings of any size: one file, or a folder of Parquet part files, in chunks of rows.

A large embedding (a country of H3 cells) is written a chunk of rows at a time, so the Arrow copy of the table
never exists whole beside the DataFrame: a single ``.parquet`` file gets one row group per chunk, a folder
(``--out DIR/``) one ``part-NNNNN.parquet`` file per chunk, each carrying the same schema and metadata (the
dataset the embedding belongs to). A folder is read back as one table (``pandas.read_parquet`` of the folder,
or ``evaluate --embedding DIR``) with the rows in their original order.

Nothing is half-written: a file goes through a temporary name, a folder is filled beside its target and
renamed into place, and either is removed if the write fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from urbanprofile.data.io import replace_folder, write_atomic
from urbanprofile.errors import UrbanProfileError

#: Above this many rows a single output file is written in chunks even when no chunk size was asked for.
AUTO_CHUNK_ABOVE = 1_000_000
#: Rows per chunk when chunking was not asked for (a file above AUTO_CHUNK_ABOVE rows, or a folder).
DEFAULT_CHUNK_ROWS = 250_000
#: Name of the part files of a folder output (numbered from 0, zero-padded so they sort in row order).
PART_PATTERN = "part-{:05d}.parquet"
PART_GLOB = "part-*.parquet"


def is_folder_target(out: str | os.PathLike[str]) -> bool:
    """Whether an ``--out`` value asks for a folder of part files: written with a trailing slash, or a name
    without a ``.parquet``/``.csv`` suffix (a new name without a suffix, or an existing folder)."""
    text = os.fspath(out)
    if text.endswith(("/", os.sep)):
        return True
    path = Path(text)
    return path.suffix.lower() not in (".parquet", ".csv") and (path.is_dir() or path.suffix == "")


def check_chunk_rows(chunk_rows: object) -> int | None:
    """A chunk size given by the user: ``None`` (not given) or a whole number of rows >= 1.

    Raises:
        UrbanProfileError: Anything else (zero, negative, a fraction, a bool), in one line.
    """
    if chunk_rows is None:
        return None
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise UrbanProfileError(f"--chunk-rows must be a whole number of rows >= 1, got {chunk_rows!r}")
    return chunk_rows


def check_embedding_target(out: str | os.PathLike[str], chunk_rows: object = None) -> tuple[Path, bool]:
    """Check ``--out`` and ``--chunk-rows`` before any work: the target path and whether it is a folder.

    Raises:
        UrbanProfileError: A bad chunk size, a file name that is neither ``.parquet`` nor ``.csv``, or a folder
            output with a suffix-less name that is an existing file.
    """
    check_chunk_rows(chunk_rows)
    path = Path(out)
    if is_folder_target(out):
        if path.exists() and not path.is_dir():
            raise UrbanProfileError(f"{path}: exists and is not a folder (a folder of part files was asked for)")
        return path, True
    if path.suffix.lower() not in (".parquet", ".csv"):
        raise UrbanProfileError(f"{path}: output must end in .parquet or .csv, or be a folder (DIR/) of Parquet "
                                "part files")
    return path, False


def _chunk_tables(frame: pd.DataFrame, chunk_rows: int):  # type: ignore[no-untyped-def]
    """Arrow tables of consecutive row slices; only one slice is converted at a time."""
    import pyarrow as pa

    for start in range(0, max(len(frame), 1), chunk_rows):
        yield pa.Table.from_pandas(frame.iloc[start:start + chunk_rows], preserve_index=True)


def _write_parquet_chunks(frame: pd.DataFrame, path: Path, chunk_rows: int) -> None:
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | None = None
    try:
        for table in _chunk_tables(frame, chunk_rows):
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=chunk_rows)
    finally:
        if writer is not None:
            writer.close()


def _write_csv_chunks(frame: pd.DataFrame, path: Path, chunk_rows: int) -> None:
    for k, start in enumerate(range(0, max(len(frame), 1), chunk_rows)):
        frame.iloc[start:start + chunk_rows].to_csv(path, mode="w" if k == 0 else "a", header=k == 0)


def _part_folder_only(folder: Path) -> bool:
    """Whether a folder holds nothing but part files (so ``--overwrite`` may replace it without losing
    anything the user did not write with ``embed``)."""
    return all(item.is_file() and item.match(PART_GLOB) for item in folder.iterdir())


def write_embedding(
    frame: pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[Path, int]:
    """Write an embedding (indexed by ``region_id``) to a file or to a folder of part files.

    Args:
        frame: The embedding; its ``attrs`` (the dataset name) go into every Parquet file's metadata.
        out: A ``.parquet`` or ``.csv`` file, or a folder (see :func:`is_folder_target`).
        chunk_rows: Rows per row group, CSV chunk or part file. ``None``: a folder gets
            :data:`DEFAULT_CHUNK_ROWS` per part; a file is written whole up to :data:`AUTO_CHUNK_ABOVE` rows
            and in chunks of :data:`DEFAULT_CHUNK_ROWS` above.
        overwrite: Replace an existing target (a folder only if it holds nothing but part files).
        on_chunk: Called with (rows written so far, rows in all) after each chunk of a folder output.

    Returns:
        The path written and the number of pieces (part files, or 1 for a file).

    Raises:
        UrbanProfileError: A bad chunk size or target, an existing target without ``overwrite``, or a folder
            that holds other files.
    """
    path, folder = check_embedding_target(out, chunk_rows)
    if path.exists() and not overwrite:
        raise UrbanProfileError(f"{path}: already exists; pass --overwrite to replace it")
    if not folder:
        size = chunk_rows or (DEFAULT_CHUNK_ROWS if len(frame) > AUTO_CHUNK_ABOVE else None)
        parquet = path.suffix.lower() == ".parquet"
        if size is None:
            write_atomic(path, frame.to_parquet if parquet else frame.to_csv)
        else:
            chunked = _write_parquet_chunks if parquet else _write_csv_chunks
            write_atomic(path, lambda tmp: chunked(frame, tmp, size))
        return path, 1
    if path.exists() and not _part_folder_only(path):
        raise UrbanProfileError(f"{path}: holds files that are not embedding parts ({PART_GLOB}); not replacing it")
    rows = chunk_rows or DEFAULT_CHUNK_ROWS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        import pyarrow.parquet as pq

        n_parts = 0
        for k, table in enumerate(_chunk_tables(frame, rows)):
            pq.write_table(table, tmp / PART_PATTERN.format(k))
            n_parts = k + 1
            if on_chunk is not None:
                on_chunk(min((k + 1) * rows, len(frame)), len(frame))
        os.chmod(tmp, 0o755)
        replace_folder(tmp, path)  # an existing folder was checked above to hold only part files
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path, n_parts


def part_files(folder: Path) -> list[Path]:
    """The part files of a folder output, in row order."""
    return sorted(folder.glob(PART_GLOB))
