"""Discover datasets from the layout of a data directory (no hard-coded list) and load them by name.

Each dataset family is one :class:`DatasetFamily` registration (:func:`register_family`, or an
``urbanprofile.datasets`` entry point): how to find its datasets under a data directory, and how to load one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from urbanprofile.errors import DataError, DatasetNotFoundError, unknown_name
from urbanprofile.registry import Registry

if TYPE_CHECKING:
    from urbanprofile.data.city import CityData

ENV_VAR = "URBANPROFILE_DATA"

#: Files every ``hafusion/<city>/`` folder must hold to be a dataset.
HAFUSION_REQUIRED = (
    "poi_dist.npy",
    "landUse_dist.npy",
    "mob_dist.npy",
    "check_counts.npy",
    "crime_counts.npy",
    "serviceCall_counts.npy",
)


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset found in the data directory, not yet loaded."""

    name: str
    family: str
    path: Path
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def declared_tasks(self) -> tuple[str, ...]:
        """Tasks a built dataset's manifest declares (its own indicators), and those of indicator sets attached to
        it (``$URBANPROFILE_INDICATORS``); empty for the benchmark families otherwise."""
        from urbanprofile.data.indicators import declared_indicator_tasks

        attached = declared_indicator_tasks(self.name)
        if self.family != "built":
            return attached
        from urbanprofile.data.loaders.built import read_manifest

        labels = read_manifest(self.path).get("labels") or {}
        return (*(str(t) for t in labels.get("tasks", [])), *attached)

    def load(self) -> CityData:
        """Read and validate the dataset."""
        if self.missing:
            raise DataError(f"{self.path / self.missing[0]}: file not found (required for dataset {self.name!r})")
        from urbanprofile.data.indicators import apply_indicator_sets

        return apply_indicator_sets(FAMILIES.get(self.family).load(self)).validate()


def _load_hafusion(entry: DatasetEntry) -> CityData:
    from urbanprofile.data.loaders.hafusion import load_hafusion_city

    return load_hafusion_city(entry.path, entry.name)


def _load_cityview(entry: DatasetEntry) -> CityData:
    from urbanprofile.data.loaders.cityview import load_cityview_city

    return load_cityview_city(entry.path, entry.name)


def _load_urbanvlp(entry: DatasetEntry) -> CityData:
    from urbanprofile.data.loaders.cityview import load_urbanvlp_indicators

    return load_urbanvlp_indicators(entry.path, entry.name)


def _load_raster_regions(entry: DatasetEntry) -> CityData:
    from urbanprofile.data.loaders.raster_regions import load_raster_regions

    return load_raster_regions(entry.path, entry.name)


def _load_built(entry: DatasetEntry) -> CityData:
    from urbanprofile.data.loaders.built import load_built

    return load_built(entry.path, entry.name)


#: Folder under the data directory where built datasets (``built/<city>/manifest.json``) are discovered.
BUILT_DIR = "built"


def built_entry(folder: Path) -> DatasetEntry:
    """The entry of a built dataset folder: ``built-<folder name>``."""
    return DatasetEntry(f"built-{folder.name.lower()}", "built", folder)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: the argument, else ``$URBANPROFILE_DATA``; it must exist."""
    chosen = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    if not chosen:
        raise DatasetNotFoundError(f"no data directory: pass --data-dir or set {ENV_VAR}")
    path = Path(chosen).expanduser()
    if path.exists() and not path.is_dir():
        raise DatasetNotFoundError(f"data directory {path} is a file, not a folder")
    if not path.is_dir():
        raise DatasetNotFoundError(f"data directory {path} does not exist")
    return path


@dataclass(frozen=True)
class DatasetFamily:
    """One kind of dataset: how its datasets are found under a data directory and how one is loaded.

    Attributes:
        name: Registry name (:attr:`DatasetEntry.family`).
        discover: The entries of this family under a data directory's root, without reading any array.
        load: The :class:`CityData` of one entry (validated by the caller).
        folders: Top-level folders of the data directory that belong to this family (no other family looks
            for datasets there).
    """

    name: str
    discover: Callable[[Path], Iterable[DatasetEntry]]
    load: Callable[[DatasetEntry], CityData]
    folders: tuple[str, ...] = ()


#: Every dataset family; plug-ins come from the ``urbanprofile.datasets`` entry-point group (a ``DatasetFamily``).
FAMILIES: Registry[DatasetFamily] = Registry("dataset family", "urbanprofile.datasets", name_of=lambda f: f.name,
                                             accepts=lambda obj: isinstance(obj, DatasetFamily))


def register_family(family: DatasetFamily, replace: bool = False) -> DatasetFamily:
    """Add a dataset family (``replace=True`` to override one of the same name)."""
    return FAMILIES.register(family.name, family, replace=replace)


def _discover_hafusion(root: Path) -> Iterable[DatasetEntry]:
    hafusion = root / "hafusion"
    if not hafusion.is_dir():
        return
    for folder in sorted(p for p in hafusion.iterdir() if p.is_dir()):
        present = [f for f in HAFUSION_REQUIRED if (folder / f).is_file()]
        if not present:
            continue
        missing = tuple(f for f in HAFUSION_REQUIRED if f not in present)
        name = f"hafusion-{folder.name.lower()}"
        yield DatasetEntry(name, "hafusion", folder, missing)


def _discover_cityview(root: Path) -> Iterable[DatasetEntry]:
    labels = root / "cityview" / "labels"
    if labels.is_dir():
        for csv in sorted(labels.glob("*.csv")):
            yield DatasetEntry(f"cityview-{csv.stem.lower()}", "cityview", csv)


def _discover_urbanvlp(root: Path) -> Iterable[DatasetEntry]:
    if (root / "cityview" / "labels").is_dir():
        for csv in sorted((root / "cityview").glob("*_indicators_urbanvlp.csv")):
            city = csv.name.split("_indicators")[0].lower()
            yield DatasetEntry(f"cityview-{city}-urbanvlp", "cityview-urbanvlp", csv)


def _discover_raster_regions(root: Path) -> Iterable[DatasetEntry]:
    from urbanprofile.data.loaders.raster_regions import raster_region_files

    claimed = {folder for name in FAMILIES.names() for folder in FAMILIES.get(name).folders}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in claimed):
        if raster_region_files(folder) is not None:
            yield DatasetEntry(folder.name.lower(), "raster-regions", folder)


def _discover_built(root: Path) -> Iterable[DatasetEntry]:
    built = root / BUILT_DIR
    if built.is_dir():
        for folder in sorted(p for p in built.iterdir() if p.is_dir() and (p / "manifest.json").is_file()):
            yield built_entry(folder)


for _family in (
    DatasetFamily("hafusion", _discover_hafusion, _load_hafusion, ("hafusion",)),
    DatasetFamily("cityview", _discover_cityview, _load_cityview, ("cityview",)),
    DatasetFamily("cityview-urbanvlp", _discover_urbanvlp, _load_urbanvlp, ("cityview",)),
    DatasetFamily("raster-regions", _discover_raster_regions, _load_raster_regions),
    DatasetFamily("built", _discover_built, _load_built, (BUILT_DIR,)),
):
    register_family(_family)


def discover(data_dir: str | os.PathLike[str] | None = None) -> dict[str, DatasetEntry]:
    """Every dataset in the data directory, by name, without reading any array.

    Each registered family looks for its own datasets. The built-in ones: ``hafusion/<city>/`` holding any of
    the multi-view files is ``hafusion-<city>`` (listed as incomplete when some required file is missing);
    ``cityview/labels/<City>.csv`` is ``cityview-<city>``; ``built/<city>/manifest.json`` (written by
    ``urbanprofile build``) is ``built-<city>``; ``cityview/<city>_indicators_urbanvlp.csv`` is
    ``cityview-<city>-urbanvlp``; any other top-level folder holding exactly one polygon file and one GeoTIFF
    (e.g. ``olinda/``) is a raster-regions dataset named after the folder.
    """
    root = resolve_data_dir(data_dir)
    found: dict[str, DatasetEntry] = {}
    for family in FAMILIES.names():
        for entry in FAMILIES.get(family).discover(root):
            found[entry.name] = entry
    return found


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the datasets in the data directory."""
    return sorted(discover(data_dir))


def get_entry(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetEntry:
    """The entry of a dataset, or a one-line error listing the valid names.

    ``name`` may also be the path of a built dataset folder (one holding ``manifest.json``); then no data
    directory is needed.
    """
    folder = Path(name).expanduser()
    if (folder / "manifest.json").is_file():
        return built_entry(folder.resolve())
    if os.sep in name:
        raise DatasetNotFoundError(f"{folder}: not a built dataset folder (no manifest.json)")
    entries = discover(data_dir)
    if name not in entries:
        raise unknown_name("dataset", name, entries)
    return entries[name]


def load_dataset(name: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> CityData:
    """Load and validate a dataset by name, or from the path of a built dataset folder."""
    return get_entry(os.fspath(name), data_dir).load()
