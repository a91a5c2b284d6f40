"""The self-describing dataset folder that ``urbanprofile build`` writes: GeoParquet regions, Parquet views.

Layout of a built folder::

    manifest.json          format, name, CRS, region ids, views (file, units, layout), labels, sources,
                           build command and the build report's counts
    regions.parquet        GeoParquet, EPSG:4326, one row per region (region_id, name, lon, lat, geometry)
    poi_counts.parquet     dense views: one row per region_id, one column per category/class
    od_flows.parquet       square views as sparse (origin, destination, trips) rows
    od_patterns.parquet    (pattern, origin, destination, trips) rows
    labels.parquet         one row per region_id, one column per indicator

Writing goes to a temporary folder beside the target that is renamed into place at the end, so a
failure never leaves a half-written dataset.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import (
    SPARSE_VIEW_ABOVE,
    SQUARE_VIEWS,
    CityData,
    frame_from_array,
    sparse_square_view,
    view_csr,
)
from urbanprofile.data.io import building_folder, first_line, load_json, read_table, replace_folder
from urbanprofile.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "urbanprofile-city"
FORMAT_VERSION = 1
#: Time-pattern OD tensors larger than this many cells stay on disk only (too big as a dense view).
MAX_DENSE_PATTERN_CELLS = 25_000_000


def is_built_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a built-dataset manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a built folder, checked for format and version."""
    manifest = load_json(folder / MANIFEST)
    where = folder / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not an urbanprofile dataset manifest (format must be {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        version = manifest.get("version")
        raise DataError(f"{where}: unsupported manifest version {version!r} (expected {FORMAT_VERSION})")
    for key in ("name", "regions", "views"):
        if key not in manifest:
            raise DataError(f"{where}: missing key {key!r}")
    # A hand-edited manifest: every entry that names a file must be an object holding a "file" string.
    entries = [("regions", manifest["regions"])]
    if not isinstance(manifest["views"], dict):
        raise DataError(f"{where}: 'views' must be an object {{view name: {{\"file\": ...}}}}, "
                        f"got a {type(manifest['views']).__name__}")
    entries += [(f"views.{view}", spec) for view, spec in manifest["views"].items()]
    if manifest.get("labels") is not None:
        entries.append(("labels", manifest["labels"]))
    for key, entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            got = type(entry).__name__ if not isinstance(entry, dict) else "an object without a 'file' string"
            raise DataError(f"{where}: {key!r} must be an object with a 'file' name, got {got}")
    return manifest


def dataset_file(folder: Path, name: str, key: str) -> Path:
    """The file a manifest entry names, which must lie inside the dataset folder (no absolute path, no '..')."""
    root = folder.resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise DataError(f"{folder / MANIFEST}: {key!r} names {name!r}, outside the dataset folder "
                        "(files must lie inside it)")
    return path


def dataset_files(folder: Path, manifest: dict[str, Any]) -> set[str]:
    """Names (relative to ``folder``) of the files a manifest lists, the manifest included."""
    names = {MANIFEST, str(manifest["regions"]["file"])}
    names.update(str(spec["file"]) for spec in manifest["views"].values())
    if manifest.get("labels"):
        names.add(str(manifest["labels"]["file"]))
    return {str(Path(n)) for n in names}


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse an output folder that a build would wrongly replace.

    Only a folder that ``urbanprofile build`` wrote (our manifest) holding nothing but the dataset's own files
    may be replaced, and only with ``overwrite``: anything else there (the inputs, a thesis) is the user's.
    """
    if target.exists() and not target.is_dir():
        raise DataError(f"{target}: exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise DataError(f"{target}: already exists and is not empty (pass --overwrite to replace it)")
    try:
        manifest = read_manifest(target)
    except DataError:
        raise DataError(f"{target}: not a built dataset (no urbanprofile manifest.json), so --overwrite will not "
                        "replace it; choose another --out") from None
    own = dataset_files(target, manifest)
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if p.name not in own)
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise DataError(f"{target}: holds files that are not part of the dataset ({listed}); --overwrite would "
                        "delete them: move them out first")


def _sparse_rows(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Non-zero cells of a square view as (origin, destination, value) rows (a sparse view is not densified)."""
    return _matrix_rows(view_csr(frame), frame.index, value)


def _matrix_rows(matrix: Any, ids: pd.Index, value: str) -> pd.DataFrame:
    """Non-zero cells of a SciPy sparse (N, N) matrix as (origin, destination, value) rows, row by row."""
    csr = matrix.tocsr().astype(float)
    csr.sum_duplicates()  # canonical: duplicates summed, columns sorted within each row (as a view's matrix is)
    coo = csr.tocoo()
    keep = coo.data != 0
    return pd.DataFrame({"origin": ids[coo.row[keep]], "destination": ids[coo.col[keep]], value: coo.data[keep]})


def _pattern_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Non-zero cells of the ``od_patterns`` view as (pattern, origin, destination, trips) rows."""
    n = len(frame)
    tensor = frame.to_numpy().reshape(n, -1, n)
    origin, pattern, dest = np.nonzero(tensor)
    ids = frame.index
    return pd.DataFrame(
        {"pattern": pattern, "origin": ids[origin], "destination": ids[dest], "trips": tensor[origin, pattern, dest]}
    )


def write_built(
    city: CityData,
    folder: str | os.PathLike[str],
    manifest_extra: dict[str, Any],
    overwrite: bool = False,
    od_pattern_rows: pd.DataFrame | None = None,
    od_matrix: Any = None,
) -> Path:
    """Write ``city`` as a built dataset folder, atomically.

    Args:
        city: A validated city.
        folder: Target folder; it must not exist (or be empty) unless ``overwrite``.
        manifest_extra: Extra manifest keys (``sources``, ``build_command``, ``report``, ``units``...).
        overwrite: Replace an existing folder.
        od_pattern_rows: Time-pattern trips as (pattern, origin, destination, trips) rows, for cities whose
            pattern tensor is too large to hold as a view.
        od_matrix: The ``od_flows`` view as a SciPy sparse matrix (regions in order), for a city built without it
            among its views; validated here as the view would be (finite, not negative).

    Raises:
        DataError: The folder cannot be written, or ``od_matrix`` holds a negative or non-finite count.
    """
    target = Path(folder).expanduser()
    check_output(target, overwrite)
    tmp: Path | None = None
    try:
        tmp = building_folder(target)
        manifest = _write_files(city, tmp, manifest_extra, od_pattern_rows, od_matrix)
        _dump_json(tmp / MANIFEST, manifest)
        replace_folder(tmp, target)
    except OSError as err:  # read-only location, full disk: the old folder (if any) is left as it was
        raise DataError(f"{target}: cannot write the dataset ({err.strerror or first_line(err)})") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_files(
    city: CityData, folder: Path, extra: dict[str, Any], od_pattern_rows: pd.DataFrame | None,
    od_matrix: Any = None,
) -> dict[str, Any]:
    regions = city.regions.copy()
    regions.index = regions.index.rename("region_id")
    regions.reset_index().to_parquet(folder / "regions.parquet", index=False)
    units: dict[str, str] = extra.get("units", {})
    views: dict[str, Any] = {}
    for name, frame in city.views.items():
        if name == "od_patterns":
            continue
        if name in SQUARE_VIEWS:
            _sparse_rows(frame, "value").to_parquet(folder / f"{name}.parquet", index=False)
            views[name] = {"file": f"{name}.parquet", "layout": "sparse", "units": units.get(name, "")}
        else:
            out = frame.copy()
            out.columns = [str(c) for c in out.columns]
            out.reset_index().to_parquet(folder / f"{name}.parquet", index=False)
            views[name] = {"file": f"{name}.parquet", "layout": "dense", "columns": list(out.columns),
                           "units": units.get(name, "")}
    if od_matrix is not None and "od_flows" not in city.views:
        rows = _matrix_rows(od_matrix, city.region_ids, "value")
        values = rows["value"].to_numpy()
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            region = rows["origin"].iloc[int(np.argmax(bad))]
            raise DataError(f"{city.name}: view 'od_flows' has negative or non-finite counts (region {region})")
        rows.to_parquet(folder / "od_flows.parquet", index=False)
        views["od_flows"] = {"file": "od_flows.parquet", "layout": "sparse", "units": units.get("od_flows", "")}
    patterns = _pattern_rows(city.views["od_patterns"]) if "od_patterns" in city.views else od_pattern_rows
    if patterns is not None:
        patterns.to_parquet(folder / "od_patterns.parquet", index=False)
        n_patterns = int(extra.get("n_time_patterns", patterns["pattern"].max() + 1 if len(patterns) else 0))
        views["od_patterns"] = {"file": "od_patterns.parquet", "layout": "patterns", "n_patterns": n_patterns,
                                "units": units.get("od_patterns", "")}
    labels = None
    if len(city.targets.columns):
        city.targets.rename_axis("region_id").reset_index().to_parquet(folder / "labels.parquet", index=False)
        labels = {"file": "labels.parquet", "tasks": list(city.targets.columns),
                  "units": {t: units.get(t, "") for t in city.targets.columns}}
    ids = city.region_ids
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": city.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "crs": "EPSG:4326",
        "regions": {
            "file": "regions.parquet",
            "count": len(ids),
            "id_kind": city.meta.get("region_kind", "polygon"),
            "id_dtype": "str" if ids.dtype.kind in "OUT" or str(ids.dtype) == "str" else "int",
            **({"h3_resolution": city.meta["h3_resolution"]} if "h3_resolution" in city.meta else {}),
        },
        "views": views,
        "labels": labels,
        "protocol": {"paper_folds": city.meta.get("paper_folds"), "drop_zero": city.meta.get("drop_zero", [])},
        **{k: v for k, v in extra.items() if k != "units"},
        "units": units,
    }


def _dump_json(path: Path, payload: Any) -> None:
    import json

    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def load_built(folder: str | os.PathLike[str], name: str | None = None) -> CityData:
    """Read a built dataset folder into a :class:`CityData` (not yet validated)."""
    import geopandas as gpd

    root = Path(folder).expanduser()
    manifest = read_manifest(root)
    regions_file = dataset_file(root, manifest["regions"]["file"], "regions")
    try:
        table = gpd.read_parquet(regions_file)
    except Exception as err:  # pyarrow and geopandas raise many types for a corrupt file
        raise DataError(f"{regions_file}: cannot read GeoParquet regions ({first_line(err)})") from None
    if "region_id" not in table.columns:
        raise DataError(f"{regions_file}: no 'region_id' column")
    if table["region_id"].isna().any():
        raise DataError(f"{regions_file}: row {int(np.argmax(table['region_id'].isna().to_numpy())) + 1} has no "
                        "region_id")
    if table["region_id"].duplicated().any():
        first = table["region_id"][table["region_id"].duplicated()].tolist()[0]  # a Python value, for its repr
        raise DataError(f"{regions_file}: duplicate region_id {first!r}")
    regions = table.set_index("region_id")
    if regions.crs is not None and not regions.crs.equals("EPSG:4326"):
        regions = regions.to_crs("EPSG:4326")
    ids = regions.index
    views: dict[str, pd.DataFrame] = {}
    notes: list[str] = list(manifest.get("notes", []))
    for view, spec in manifest["views"].items():
        path = dataset_file(root, spec["file"], f"views.{view}")
        frame = read_table(path)
        layout = spec.get("layout", "dense")
        if layout == "dense":
            views[view] = _dense_view(path, frame, ids)
        elif layout == "sparse":
            matrix = _square_from_rows(path, frame, ids, "value")
            # A large city's square view stays sparse in memory, as on disk (validated without densifying).
            views[view] = (sparse_square_view(matrix, ids) if len(ids) > SPARSE_VIEW_ABOVE
                           else frame_from_array(matrix.toarray(), ids, ids))
        elif layout == "patterns":
            n_patterns = int(spec.get("n_patterns", 0))
            if len(ids) > SPARSE_VIEW_ABOVE or n_patterns * len(ids) ** 2 > MAX_DENSE_PATTERN_CELLS:
                notes.append(f"od_patterns kept on disk only ({n_patterns} x {len(ids)}^2 cells)")
                continue
            views[view] = patterns_view(frame, ids, n_patterns, str(path))
        else:
            raise DataError(f"{root / MANIFEST}: view {view!r} has unknown layout {layout!r}")
    targets = pd.DataFrame(index=ids)
    if manifest.get("labels"):
        path = dataset_file(root, manifest["labels"]["file"], "labels")
        targets = _dense_view(path, read_table(path), ids).astype(float)
    protocol = manifest.get("protocol") or {}
    meta: dict[str, Any] = {
        "source": str(root),
        "family": "built",
        "city": manifest.get("city", manifest["name"]),
        "description": f"{len(ids)} {manifest['regions'].get('id_kind', 'polygon')} regions built by urbanprofile",
        "units": manifest.get("units", {}),
        "paper_folds": protocol.get("paper_folds") or {"n_splits": 10, "shuffle": True, "random_state": 2024},
        "drop_zero": list(protocol.get("drop_zero") or []),
        "location_source": f"{manifest['regions'].get('id_kind', 'polygon')} regions (regions.parquet)",
        "region_kind": manifest["regions"].get("id_kind", "polygon"),
        "build_command": manifest.get("build_command", ""),
        "notes": notes,
    }
    if "h3_resolution" in manifest["regions"]:
        meta["h3_resolution"] = manifest["regions"]["h3_resolution"]
    regions.index.name = "region_id"
    return CityData(name=name or manifest["name"], regions=regions, views=views, targets=targets, meta=meta)



def _dense_view(path: Path, frame: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    if "region_id" not in frame.columns:
        raise DataError(f"{path}: no 'region_id' column")
    frame = frame.set_index("region_id")
    if frame.index.has_duplicates:
        raise DataError(f"{path}: duplicate region_id {frame.index[frame.index.duplicated()][0]!r}")
    missing = ids.difference(frame.index)
    if len(missing):
        raise DataError(f"{path}: no row for region {missing[0]!r}")
    for column in frame.columns:
        if not (pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column])):
            raise DataError(f"{path}: column {str(column)!r} holds {frame[column].dtype} values, not numbers")
    out = frame.loc[ids]
    out.index.name = "region_id"
    return out


def _positions(path: Path | str, column: pd.Series, ids: pd.Index) -> np.ndarray:
    position = ids.get_indexer(pd.Index(column))
    if (position < 0).any():
        raise DataError(f"{path}: unknown region {column[position < 0].iloc[0]!r}")
    return np.asarray(position)


def _square_from_rows(path: Path, frame: pd.DataFrame, ids: pd.Index, value: str) -> Any:
    """(origin, destination, value) rows -> a CSR matrix in region order (repeated pairs are summed)."""
    from scipy import sparse

    for column in ("origin", "destination", value):
        if column not in frame.columns:
            raise DataError(f"{path}: no {column!r} column")
    n = len(ids)
    values = frame[value].to_numpy()
    if values.dtype.kind not in "biuf":
        raise DataError(f"{path}: column {value!r} holds {frame[value].dtype} values, not numbers")
    rows = _positions(path, frame["origin"], ids)
    cols = _positions(path, frame["destination"], ids)
    return sparse.coo_matrix((values, (rows, cols)), shape=(n, n)).tocsr()


def patterns_view(rows: pd.DataFrame, ids: pd.Index, n_patterns: int, where: str = "od_patterns") -> pd.DataFrame:
    """The ``od_patterns`` view (regions x (pattern, destination)) from (pattern, origin, destination, trips) rows."""
    n = len(ids)
    for column in ("pattern", "trips"):
        if column in rows.columns and not pd.api.types.is_numeric_dtype(rows[column]):
            raise DataError(f"{where}: column {column!r} holds {rows[column].dtype} values, not numbers")
    pattern = rows["pattern"].to_numpy(dtype=int) if "pattern" in rows.columns else None
    if pattern is None or (len(pattern) and (pattern.min() < 0 or pattern.max() >= n_patterns)):
        raise DataError(f"{where}: 'pattern' must hold 0..{n_patterns - 1}")
    trips = rows["trips"].to_numpy()
    # Weighted trips may be fractional; whole counts stay integers.
    integral = trips.dtype.kind in "biu" or bool((trips == np.round(trips)).all())
    trips = trips.astype(np.int64) if integral else trips.astype(float)
    tensor = np.zeros((n, n_patterns, n), dtype=trips.dtype)
    origin = _positions(where, rows["origin"], ids)
    dest = _positions(where, rows["destination"], ids)
    np.add.at(tensor, (origin, pattern, dest), trips)
    columns = pd.MultiIndex.from_product([range(n_patterns), ids], names=["pattern", "destination"])
    return frame_from_array(tensor.reshape(n, -1), ids, columns)
