"""The modality-encoder interface and its on-disk cache.

Every frozen encoder (text, image, location) is a :class:`ModalityEncoder`: ``encode(items)`` returns one
float32 row per item, computed in batches behind a progress bar and cached on disk. The cache is keyed by
the encoder's ``name`` (which includes the weights version) and a content hash of each item, so a second
run, or a run over an overlapping set of items, only encodes what it has not seen. Ragged outputs (token
vectors, one ``(n_tokens, dim)`` block per text) use the same store.

The cache lives under :func:`cache_dir`: ``$URBANPROFILE_CACHE`` when set, else the user's cache directory
(``platformdirs``). Each call that encodes something new writes one shard ``<encoder>/<hash>.npz``
(``keys``, ``lengths``, ``values``; plain numeric arrays, read back with ``allow_pickle=False``).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.data.io import write_atomic
from urbanprofile.errors import DataError

ENV_VAR = "URBANPROFILE_CACHE"
#: Items encoded between two shard writes.
FLUSH_EVERY = 2048
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def cache_dir() -> Path:
    """Root of urbanprofile's cache: ``$URBANPROFILE_CACHE``, else the platform's user cache directory."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser()
    try:
        import platformdirs
    except ImportError:  # platformdirs ships with pip's environment almost everywhere; fall back to ~/.cache
        return Path.home() / ".cache" / "urbanprofile"
    return Path(platformdirs.user_cache_dir("urbanprofile"))


def digest(data: bytes) -> bytes:
    """The 32-hex-character content hash used as a cache key."""
    return hashlib.blake2b(data, digest_size=16).hexdigest().encode()


class EncoderCache:
    """Per-encoder store of vectors (or ragged blocks of vectors) keyed by item hash.

    Args:
        name: The encoder's name (weights version included); one sub-folder per name.
        root: Cache root; default :func:`cache_dir`.
    """

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.folder = (root or cache_dir()) / _SAFE.sub("_", name)
        self._index: dict[bytes, np.ndarray] | None = None

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._index is not None:
            return self._index
        index: dict[bytes, np.ndarray] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("*.npz")):
                try:
                    with np.load(shard, allow_pickle=False) as data:
                        keys, lengths, values = data["keys"], data["lengths"], data["values"]
                except (OSError, ValueError, KeyError, EOFError):
                    continue  # a damaged shard is ignored and its items re-encoded
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for row, key in enumerate(keys):
                    index[bytes(key)] = values[offsets[row] : offsets[row + 1]]
        self._index = index
        return index

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """The stored block for each key, ``None`` where absent."""
        index = self._load()
        return [index.get(k) for k in keys]

    def put(self, keys: Sequence[bytes], blocks: Sequence[np.ndarray]) -> None:
        """Store one block (rows x dim) per key in a new shard."""
        if not keys:
            return
        index = self._load()
        lengths = np.array([len(b) for b in blocks], dtype=np.int64)
        values = np.concatenate([np.asarray(b) for b in blocks], axis=0)
        key_array = np.array(list(keys), dtype="S32")
        shard = self.folder / f"{digest(key_array.tobytes()).decode()}.npz"

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, keys=key_array, lengths=lengths, values=values)

        with contextlib.suppress(OSError):  # a read-only or full cache only costs a re-encode next time
            write_atomic(shard, write)
        for key, block in zip(keys, blocks, strict=True):
            index[key] = np.asarray(block)


class ModalityEncoder(abc.ABC):
    """A frozen pretrained encoder: ``encode(items) -> (n, dim)`` float32, batched, cached.

    Subclasses set ``name`` (including the weights version) and ``dim``, and implement
    :meth:`_encode_batch` and :meth:`item_key`.
    """

    name: str = ""
    dim: int = 0
    #: Items per forward pass.
    batch_size: int = 32

    @abc.abstractmethod
    def _encode_batch(self, items: Sequence[Any]) -> np.ndarray:
        """Encode a batch: (len(items), dim) float32."""

    @abc.abstractmethod
    def item_key(self, item: Any) -> bytes:
        """A content hash of one item (see :func:`digest`)."""

    def encode(self, items: Sequence[Any], *, cache: bool = True, progress: bool = True) -> np.ndarray:
        """One row per item, float32 (n, dim); cached on disk unless ``cache=False``."""
        return cached_encode(self, items, cache=cache, progress=progress)


def cached_encode(
    encoder: ModalityEncoder,
    items: Sequence[Any],
    *,
    cache: bool = True,
    progress: bool = True,
    root: Path | None = None,
) -> np.ndarray:
    """Encode ``items`` with ``encoder``, reading from and writing to the cache.

    Args:
        encoder: The encoder (its ``name`` keys the cache folder).
        items: The inputs.
        cache: Whether to use the on-disk cache.
        progress: Show a progress bar on stderr for the items not found in the cache.
        root: Cache root (default :func:`cache_dir`).

    Returns:
        (len(items), encoder.dim) float32.
    """
    blocks = _cached_blocks(
        encoder.name, items, encoder.item_key, encoder._encode_batch, encoder.batch_size,
        cache=cache, progress=progress, root=root, ragged=False,
    )
    if not blocks:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    out = np.concatenate(blocks, axis=0).astype(np.float32, copy=False)
    if out.shape != (len(items), encoder.dim):
        raise RuntimeError(f"{encoder.name}: produced shape {out.shape}, expected ({len(items)}, {encoder.dim})")
    if not np.isfinite(out).all():
        row = int(np.argmax(~np.isfinite(out).all(1)))
        raise DataError(f"{encoder.name}: produced non-finite vectors (item {row})")
    return out


def cached_blocks(
    name: str,
    items: Sequence[Any],
    key: Callable[[Any], bytes],
    encode_batch: Callable[[Sequence[Any]], list[np.ndarray]],
    batch_size: int,
    *,
    cache: bool = True,
    progress: bool = True,
    root: Path | None = None,
    store_dtype: str = "float32",
) -> list[np.ndarray]:
    """Like :func:`cached_encode` for ragged outputs: one ``(rows_i, dim)`` block per item.

    ``store_dtype="float16"`` halves the disk size of large ragged outputs (token vectors); blocks are
    returned as float32 either way.
    """
    return _cached_blocks(name, items, key, encode_batch, batch_size, cache=cache, progress=progress, root=root,
                          ragged=True, store_dtype=store_dtype)


def _cached_blocks(
    name: str,
    items: Sequence[Any],
    key: Callable[[Any], bytes],
    encode_batch: Callable[[Sequence[Any]], Any],
    batch_size: int,
    *,
    cache: bool,
    progress: bool,
    root: Path | None,
    ragged: bool,
    store_dtype: str = "float32",
) -> list[np.ndarray]:
    items = list(items)
    keys = [key(item) for item in items]
    store = EncoderCache(name, root) if cache else None
    found = store.get(keys) if store is not None else [None] * len(items)
    blocks: list[np.ndarray | None] = list(found)
    todo = [i for i, b in enumerate(blocks) if b is None]
    # Identical items are encoded once.
    first: dict[bytes, int] = {}
    unique = [i for i in todo if first.setdefault(keys[i], i) == i]
    new_keys: list[bytes] = []
    new_blocks: list[np.ndarray] = []
    for batch in _batches(unique, batch_size, progress, name):
        if store is not None and len(new_keys) >= FLUSH_EVERY:  # a long run interrupted keeps its work
            store.put(new_keys, new_blocks)
            new_keys, new_blocks = [], []
        out = encode_batch([items[i] for i in batch])
        parts = list(out) if ragged else [np.asarray(out)[j : j + 1] for j in range(len(batch))]
        for i, part in zip(batch, parts, strict=True):
            block = np.asarray(part, dtype=np.float32)
            blocks[i] = block
            new_keys.append(keys[i])
            new_blocks.append(block.astype(store_dtype, copy=False))
    for i in todo:
        if blocks[i] is None:
            blocks[i] = blocks[first[keys[i]]]
    if store is not None and new_keys:
        store.put(new_keys, new_blocks)
    return [np.asarray(b, dtype=np.float32) for b in blocks if b is not None]


def _batches(indices: list[int], size: int, progress: bool, label: str) -> Iterator[list[int]]:
    chunks = [indices[k : k + size] for k in range(0, len(indices), max(size, 1))]
    if not progress or len(chunks) <= 1:
        yield from chunks
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"encoding ({label})", total=len(indices))
        for chunk in chunks:
            yield chunk
            bar.advance(task, len(chunk))
