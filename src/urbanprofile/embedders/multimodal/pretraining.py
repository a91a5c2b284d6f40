"""Pretrain UrbanFusion on a modality store and write the checkpoint folder (what ``urbanprofile pretrain`` runs).

Three ways, the same model for the same seed where the batches are the same: through the ``DataLoader`` over
the memory-mapped store (``executor="local"``, the default), with the store read into memory first
(``in_memory=True``: the small-input path), or data-parallel on Ray Train (``executor="ray"``, ``workers`` N).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.data.io import replace_folder
from urbanprofile.embedders.multimodal.pretrain_store import ModalityStore, open_store
from urbanprofile.embedders.multimodal.urbanfusion import CHECKPOINT, CHECKPOINT_META, UrbanFusionEmbedder
from urbanprofile.errors import UrbanProfileError

EXECUTORS = ("local", "ray")


def check_checkpoint_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that exists (unless ``overwrite``) or that holds anything but a checkpoint's files."""
    if not out.exists():
        return
    if not overwrite:
        raise UrbanProfileError(f"{out}: already exists; pass --overwrite to replace it")
    stray = sorted(p.name for p in out.iterdir() if p.name not in (CHECKPOINT, CHECKPOINT_META))
    if stray:
        raise UrbanProfileError(f"{out}: holds {stray[0]!r}, which is not part of a checkpoint; not replaced")


def pretrain_checkpoint(store: Path, out: Path, *, executor: str = "local", workers: int = 1,
                        address: str | None = None, in_memory: bool = False, overwrite: bool = False,
                        **params: Any) -> UrbanFusionEmbedder:
    """Pretrain on ``store`` and write the checkpoint folder ``out`` (nothing is written if training fails).

    Args:
        store: A modality store folder.
        out: The checkpoint folder to write.
        executor: ``local`` (one process) or ``ray`` (Ray Train, ``workers`` data-parallel workers).
        workers: Data-parallel workers (``ray``); with ``local``, each batch is split into this many shards
            (the single-process twin of ``ray`` with as many workers).
        address: A running Ray cluster for ``ray`` (default: a local Ray for the run).
        in_memory: Read the whole store into memory and train without the data loader.
        overwrite: Replace an existing checkpoint folder.
        **params: ``UrbanFusionEmbedder`` parameters (epochs, batch_size, d_model, random_state, ...).

    Returns:
        The fitted embedder.
    """
    if executor not in EXECUTORS:
        raise UrbanProfileError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers < 1:
        raise UrbanProfileError(f"--workers must be >= 1, got {workers}")
    if address is not None and executor != "ray":
        raise UrbanProfileError("--address needs --executor ray")
    if in_memory and executor == "ray":
        raise UrbanProfileError("--in-memory is for the local executor (Ray workers read the store)")
    check_checkpoint_target(out, overwrite)
    opened = open_store(store)
    try:
        embedder = UrbanFusionEmbedder(**params, shards=workers if executor == "local" else 1)
    except TypeError as err:
        raise UrbanProfileError(f"urbanfusion: {err}") from None
    try:
        if executor == "ray":
            from urbanprofile.embedders.multimodal.ray_pretrain import pretrain_on_ray

            pretrain_on_ray(embedder, store, num_workers=workers, address=address)
        else:
            embedder._validate()
            embedder.names_ = embedder._store_names(opened)
            embedder.dims_ = {m: opened.dims[m] for m in embedder.names_}
            if in_memory:
                opened = ModalityStore.from_arrays({m: np.array(opened.values[m]) for m in embedder.names_},
                                                   {m: np.array(opened.present[m]) for m in embedder.names_})
            embedder.fit_store(opened)
    except ValueError as err:  # a parameter out of range
        raise UrbanProfileError(f"urbanfusion: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        embedder.save_checkpoint(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return embedder
