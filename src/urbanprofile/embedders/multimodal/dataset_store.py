"""A modality store written from datasets: every region becomes a pretraining location (``urbanprofile
pretrain-store``).

Each region's modalities are computed exactly as UrbanFusion computes them on a city
(:func:`~urbanprofile.embedders.multimodal.urbanfusion.city_modalities`: the frozen encoders, whose outputs are
cached on disk, and the count views), and written into the store one dataset at a time through
:class:`~urbanprofile.embedders.multimodal.pretrain_store.StoreWriter`, so only one dataset is in memory at once.
The writer needs the number of rows and every modality's width before the first row; they are known only once a
dataset's modalities are computed, so a first pass computes them (filling the encoders' cache) and keeps only
their shapes, and the second pass reads them again (from the cache) and writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from urbanprofile.data.registry import get_entry, load_dataset
from urbanprofile.embedders.multimodal.modalities import MODALITIES, available_modalities
from urbanprofile.embedders.multimodal.pretrain_store import StoreWriter
from urbanprofile.embedders.multimodal.urbanfusion import city_modalities
from urbanprofile.errors import DataError, MethodUnavailableError, UrbanProfileError, unknown_name


@dataclass
class StoreSource:
    """What one dataset gave the store.

    Attributes:
        dataset: Its name.
        regions: Its number of regions.
        available: The modalities it has.
        rows: Locations written (regions with at least one of the store's modalities).
        widths: Width of each modality it has (before matching the store's widths).
        present: Regions with each modality, for those stored.
    """

    dataset: str
    regions: int
    available: list[str] = field(default_factory=list)
    rows: int = 0
    widths: dict[str, int] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)


@dataclass
class DatasetStore:
    """A store written by :func:`write_dataset_store`.

    Attributes:
        folder: The store.
        dims: Width of each stored modality, in store order.
        sources: What each dataset gave, in row order.
        notes: One line per (dataset, modality) stored as absent for having another width than the store's.
    """

    folder: Path
    dims: dict[str, int]
    sources: list[StoreSource]
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(s.rows for s in self.sources)


def write_dataset_store(datasets: Sequence[str], folder: str | Path, modalities: Sequence[str] | None = None,
                        data_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> DatasetStore:
    """Write a modality store whose locations are the regions of ``datasets``.

    A modality's width is that of the first dataset that has it; a dataset where it has another width (the
    ``mobility`` profile is two rows of the city's trip matrix, as wide as twice its regions) has it absent, and
    a note says so. Regions with none of the store's modalities are left out (a location needs one to train on).

    Args:
        datasets: Dataset names (or built dataset folders), in row order.
        folder: The store to create (must not exist; it appears only once every row is written).
        modalities: Modalities to store (``None``: every modality any of the datasets has).
        data_dir: Data directory (default ``$URBANPROFILE_DATA``).
        progress: Show the encoders' progress bars.

    Raises:
        UrbanProfileError: No dataset, one named twice, an unknown one, or an existing ``folder``.
        MethodUnavailableError: A requested modality no dataset has, or a dataset with none of the store's.
    """
    root = Path(folder)
    names = list(datasets)
    if not names:
        raise UrbanProfileError("give at least one dataset")
    twice = [d for d in names if names.count(d) > 1]
    if twice:
        raise UrbanProfileError(f"dataset {twice[0]!r} is given twice (its regions would be stored twice)")
    if root.exists():
        raise UrbanProfileError(f"{root}: already exists (a store is written once; remove it or choose another --out)")
    for m in modalities or ():
        if m not in MODALITIES:
            raise unknown_name("modality", m, MODALITIES)
    for name in names:
        get_entry(name, data_dir)  # a typo fails before any dataset is read
    wanted = list(dict.fromkeys(modalities)) if modalities else None

    # First pass: shapes only (and the encoders' cache filled).
    sources, kept_masks, have_by = [], [], []
    for name in names:
        city = load_dataset(name, data_dir)
        available = available_modalities(city)
        have = [m for m in available if wanted is None or m in wanted]
        feats = city_modalities(city, have, progress=progress) if have else None
        source = StoreSource(name, city.n_regions, available)
        if feats is not None:
            source.widths = {m: int(feats.values[m].shape[1]) for m in have}
        sources.append(source)
        have_by.append((have, feats.present if feats is not None else {}))
        del city, feats
    dims: dict[str, int] = {}
    for m in wanted or MODALITIES:
        first = next((s.widths[m] for s in sources if m in s.widths), None)
        if first is not None:
            dims[m] = first
        elif wanted is not None:
            listed = "; ".join(f"{s.dataset}: {', '.join(s.available) or 'none'}" for s in sources)
            raise MethodUnavailableError(f"no dataset has the {m!r} modality ({listed})")
    if not dims:
        raise MethodUnavailableError(f"none of {', '.join(names)} has a modality the encoders can read")
    notes = []
    for source, (have, present) in zip(sources, have_by, strict=True):
        stored = [m for m in have if m in dims and source.widths[m] == dims[m]]
        for m in have:
            if m in dims and source.widths[m] != dims[m]:
                origin = next(s.dataset for s in sources if s.widths.get(m) == dims[m])
                notes.append(f"{source.dataset}: modality {m!r} is {source.widths[m]}-d, the store's is "
                             f"{dims[m]}-d (from {origin}): stored as absent for its {source.regions} regions")
        keep = np.zeros(source.regions, bool)
        for m in stored:
            keep |= present[m]
            source.present[m] = int(present[m].sum())
        if not keep.any():
            raise MethodUnavailableError(f"{source.dataset}: none of its regions has a stored modality "
                                         f"({', '.join(dims)}; it has: {', '.join(source.available) or 'none'})")
        source.rows = int(keep.sum())
        kept_masks.append((stored, keep))

    # Second pass: the rows, one dataset at a time.
    begin, described = 0, []
    for source, (stored, _) in zip(sources, kept_masks, strict=True):
        described.append({"dataset": source.dataset, "rows": [begin, begin + source.rows], "modalities": stored})
        begin += source.rows
    writer = StoreWriter(root, dims, begin, meta={"sources": described})
    try:
        for source, (stored, keep) in zip(sources, kept_masks, strict=True):
            city = load_dataset(source.dataset, data_dir)
            if city.n_regions != source.regions:
                raise DataError(f"{source.dataset}: changed while the store was written; run again")
            feats = city_modalities(city, stored, progress=progress)
            values, present = {}, {}
            for m, width in dims.items():
                if m in stored:
                    values[m], present[m] = feats.values[m][keep], feats.present[m][keep]
                else:
                    values[m] = np.full((source.rows, width), np.nan, np.float32)
                    present[m] = np.zeros(source.rows, bool)
            writer.append(values, present)
            del city, feats, values, present
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return DatasetStore(root, dims, sources, notes)
