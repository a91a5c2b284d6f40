"""Cached encoder outputs on disk, read in seeded mini-batches through a torch ``DataLoader`` for pretraining.

A *modality store* is a folder that holds, for each modality ``m`` of a set of pretraining locations, the frozen
encoder outputs as ``m.npy`` (``(n, d_m)`` float32, NaN rows where absent) and the presence mask as
``m.present.npy`` (``(n,)`` bool), with ``store.json`` naming the modalities, their widths and ``n``. Plain
``.npy`` files, opened memory-mapped (``np.load(mmap_mode="r", allow_pickle=False)``): a batch reads only its
rows, so pretraining memory does not grow with the number of locations (the pages the kernel caches are
reclaimable and are not the process's own).

:func:`write_store` writes one from :class:`RegionModalities` (the pooled cities of an ``urbanfusion`` run);
:class:`StoreWriter` fills one chunk by chunk (a large set of locations never in memory at once).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.errors import DataError

META = "store.json"
FORMAT = "urbanprofile-modality-store/1"
#: Rows per chunk of the standardisation pass (fixed, so both paths sum in the same order; a chunk of the 546-d
#: location modality is 36 MB in float64, and the pass holds about four such blocks at once).
MOMENT_ROWS = 8_192


@dataclass
class ModalityStore:
    """An opened store: memory-mapped values and presence masks per modality.

    Attributes:
        folder: Where it lives.
        names: Modalities, in store order.
        dims: Width of each modality.
        n: Number of locations.
        values: ``(n, d_m)`` float32 arrays (memory-mapped when opened from disk).
        present: ``(n,)`` bool arrays.
    """

    folder: Path | None
    names: list[str]
    dims: dict[str, int]
    n: int
    values: dict[str, np.ndarray]
    present: dict[str, np.ndarray]

    @classmethod
    def from_arrays(cls, values: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> ModalityStore:
        """An in-memory store over arrays already held (the small-input path)."""
        names = list(values)
        n = len(next(iter(present.values()))) if present else 0
        return cls(None, names, {m: int(values[m].shape[1]) for m in names}, n, values, present)


def open_store(folder: str | Path) -> ModalityStore:
    """Open a modality store memory-mapped.

    Raises:
        DataError: The folder, its ``store.json`` or an array is missing, unreadable or of the wrong shape.
    """
    root = Path(folder)
    meta_path = root / META
    if not meta_path.is_file():
        raise DataError(f"{root}: not a modality store (no {META}; write one with write_store)")
    try:
        meta = json.loads(meta_path.read_text())
        names, dims, n = list(meta["modalities"]), {k: int(v) for k, v in meta["dims"].items()}, int(meta["n"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: unreadable store description ({err})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    values: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m in names:
        for path, shape, dtype in ((root / f"{m}.npy", (n, dims.get(m)), np.float32),
                                   (root / f"{m}.present.npy", (n,), np.bool_)):
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the {m!r} array ({err})") from None
            if array.shape != shape or array.dtype != dtype:
                raise DataError(f"{path}: shape {array.shape} {array.dtype}, expected {shape} {np.dtype(dtype)}")
            (present if path.name.endswith(".present.npy") else values)[m] = array
    return ModalityStore(root, names, dims, n, values, present)


class StoreWriter:
    """Fill a new store chunk by chunk; the folder appears only when :meth:`close` has written every row.

    Args:
        folder: The store to create (must not exist).
        dims: Width of each modality, in store order.
        n: Number of locations.
        meta: More fields for ``store.json`` (e.g. which datasets filled which rows); the store's own fields win.
    """

    def __init__(self, folder: str | Path, dims: dict[str, int], n: int, meta: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.meta = dict(meta or {})
        if self.folder.exists():
            raise DataError(f"{self.folder}: already exists (a store is written once; remove it to rewrite)")
        self.dims, self.n, self.filled = dict(dims), int(n), 0
        self._tmp = self.folder.with_name(f".{self.folder.name}.partial")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        fmt = np.lib.format
        self._values = {m: fmt.open_memmap(self._tmp / f"{m}.npy", "w+", np.float32, (self.n, d))
                        for m, d in self.dims.items()}
        self._present = {m: fmt.open_memmap(self._tmp / f"{m}.present.npy", "w+", np.bool_, (self.n,))
                         for m in self.dims}

    def append(self, values: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> None:
        """Add the next rows (every modality, the same number of rows; absent rows are stored as NaN)."""
        rows = {len(p) for p in present.values()} | {len(v) for v in values.values()}
        if len(rows) != 1 or set(values) != set(self.dims) or set(present) != set(self.dims):
            raise DataError("a chunk needs every modality of the store with the same number of rows")
        k = rows.pop()
        if self.filled + k > self.n:
            raise DataError(f"store {self.folder}: {self.filled + k} rows given for {self.n}")
        end = self.filled + k
        for m in self.dims:
            block = np.asarray(values[m], dtype=np.float32)
            mask = np.asarray(present[m], dtype=bool)
            self._values[m][self.filled:end] = block
            self._values[m][self.filled:end][~mask] = np.nan
            self._present[m][self.filled:end] = mask
        self.filled = end

    def close(self) -> Path:
        """Flush, write ``store.json`` and move the folder into place."""
        if self.filled != self.n:
            self.abort()
            raise DataError(f"store {self.folder}: {self.filled} of {self.n} rows written")
        for array in (*self._values.values(), *self._present.values()):
            array.flush()
        self._values, self._present = {}, {}
        meta = {**self.meta, "format": FORMAT, "modalities": list(self.dims), "dims": self.dims, "n": self.n}
        (self._tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        self._tmp.rename(self.folder)
        return self.folder

    def abort(self) -> None:
        """Remove the partial folder."""
        self._values, self._present = {}, {}
        shutil.rmtree(self._tmp, ignore_errors=True)


def write_store(folder: str | Path, values: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> Path:
    """Write a whole store at once (e.g. the pooled modalities of ``UrbanFusionEmbedder``, or one city's).

    Args:
        folder: The store to create (must not exist).
        values: ``(n, d_m)`` per modality.
        present: ``(n,)`` bool per modality.
    """
    writer = StoreWriter(folder, {m: int(v.shape[1]) for m, v in values.items()}, len(next(iter(present.values()))))
    try:
        writer.append(values, present)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


# -- standardisation -----------------------------------------------------------------------------------
def moments(values: np.ndarray, present: np.ndarray, rows: int = MOMENT_ROWS) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and standard deviation of the present rows, read ``rows`` at a time (two passes, float64).

    The same arithmetic whether ``values`` is in memory or memory-mapped, so the in-memory and the data-loader
    paths standardise identically.

    Returns:
        ``(mean, std, count)``; mean and std float64 of width ``values.shape[1]``.
    """
    total = np.zeros(values.shape[1])
    count = 0
    for begin in range(0, len(values), rows):
        keep = np.asarray(present[begin:begin + rows])
        block = np.asarray(values[begin:begin + rows], dtype=np.float64)[keep]
        total += block.sum(0)
        count += len(block)
    if count == 0:
        return total, total, 0
    mean = total / count
    squares = np.zeros(values.shape[1])
    for begin in range(0, len(values), rows):
        keep = np.asarray(present[begin:begin + rows])
        block = np.asarray(values[begin:begin + rows], dtype=np.float64)[keep]
        squares += ((block - mean) ** 2).sum(0)
    return mean, np.sqrt(squares / count), count


def standardise(values: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardised float32 features, clipped to ±10; absent (NaN) rows become 0, which the mask hides."""
    out = (np.asarray(values, dtype=np.float32) - mean.astype(np.float32)) / scale.astype(np.float32)
    return np.nan_to_num(np.clip(out, -10, 10), nan=0.0)


# -- the data loader ---------------------------------------------------------------------------------------
def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``(begin, end)`` rows of each of ``shards`` near-equal parts of a batch of ``n``."""
    edges = [n * k // shards for k in range(shards + 1)]
    return list(itertools.pairwise(edges))


class StoreBatches:
    """A torch map-style dataset whose item is a whole mini-batch: ``dataset[indices]`` -> (features, mask).

    The batch is cut into ``shards`` contiguous parts (:func:`shard_bounds`) and only the features of the parts in
    ``parts`` are read: a data-parallel worker reads its own part's rows. The presence mask is read for the whole
    batch, because the views drawn for it depend on every row's available modalities (one byte per modality and
    row, against ``4 * width`` bytes of features).

    Within a part, indices are sorted before reading (memory-mapped rows are read in file order) and the rows put
    back in the batch's order, so a part is the same whatever the storage and whichever parts are read.

    Args:
        store: The store.
        names: Modalities to read, in model order.
        mean, scale: Standardisation per modality (float64 or float32 arrays).
        shards: Parts a batch is cut into.
        parts: The parts whose features are read (``None``: every part).
    """

    def __init__(self, store: ModalityStore, names: Sequence[str], mean: dict[str, np.ndarray],
                 scale: dict[str, np.ndarray], shards: int = 1, parts: Sequence[int] | None = None) -> None:
        self.store, self.names, self.mean, self.scale = store, list(names), mean, scale
        self.shards = shards
        self.parts = list(range(shards)) if parts is None else list(parts)

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, indices: np.ndarray) -> tuple[dict[int, list[Any]], Any]:
        """The features of each part read (part number -> one ``(rows, d_m)`` tensor per modality) and the
        ``(batch, modalities)`` presence mask of the whole batch."""
        import torch

        indices = np.asarray(indices)
        bounds = shard_bounds(len(indices), self.shards)
        order, back = _file_order(indices)
        masks = []
        for m in self.names:
            if m in self.store.present:
                masks.append(np.asarray(self.store.present[m][indices[order]])[back])
            else:  # a trained modality this store lacks: absent everywhere
                masks.append(np.zeros(len(indices), bool))
        parts = {}
        for k in self.parts:
            begin, end = bounds[k]
            rows = indices[begin:end]
            order, back = _file_order(rows)
            xs = []
            for m in self.names:
                if m in self.store.values:
                    raw = np.asarray(self.store.values[m][rows[order]])[back]
                    xs.append(torch.from_numpy(standardise(raw, self.mean[m], self.scale[m])))
                else:
                    xs.append(torch.zeros((len(rows), len(self.mean[m])), dtype=torch.float32))
            parts[k] = xs
        return parts, torch.from_numpy(np.column_stack(masks))


def _file_order(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts ``indices`` (read in file order) and the one that puts the rows read back."""
    order = np.argsort(indices, kind="stable")
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return order, back


class EpochBatches:
    """A torch sampler yielding one epoch's mini-batches as index arrays, in a given (seeded) order.

    ``set_order`` is called by the training loop with the epoch's permutation before the loader is iterated, so
    the batches come in exactly the order the in-memory loop would take them.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.order = np.zeros(0, dtype=np.int64)

    def set_order(self, order: np.ndarray) -> None:
        self.order = order

    def __iter__(self) -> Iterator[np.ndarray]:
        for begin in range(0, len(self.order), self.batch_size):
            yield self.order[begin:begin + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def batch_loader(dataset: StoreBatches, sampler: EpochBatches, workers: int = 0) -> Any:
    """A ``DataLoader`` over whole mini-batches (``batch_size=None``: the dataset returns batches itself).

    It has a generator of its own: a loader draws its workers' base seed when iterated, which from torch's global
    generator would shift the dropout draws of training and break "same seed, same batches, same model".
    """
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,  # type: ignore[arg-type]
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
