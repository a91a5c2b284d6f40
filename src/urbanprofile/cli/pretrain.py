"""The ``pretrain-store`` and ``pretrain`` commands: a modality store of cached encoder outputs written from datasets,
and UrbanFusion pretrained on a store (thin shells over :mod:`urbanprofile.embedders.multimodal.dataset_store` and
:mod:`urbanprofile.embedders.multimodal.pretraining`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from urbanprofile.clikit import DataDir, Parents, Threads, check_output, err, set_threads, split_list, writing


def pretrain_store(
    datasets: Annotated[str, typer.Argument(help="Comma-separated datasets (names or built dataset folders) whose "
                                            "regions become the pretraining locations.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Modality store folder to write (must not exist).")],
    modalities: Annotated[str | None, typer.Option(
        "--modalities", help="Modalities to store (default: every one that any of the datasets has).",
        show_default=False)] = None,
    parents: Parents = False,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Write a modality store (the frozen encoders' outputs per region) from datasets, for `urbanprofile pretrain`."""
    from urbanprofile.embedders.multimodal.dataset_store import write_dataset_store

    check_output(out, parents=parents, folder=True)  # an existing folder is refused by the writer: never replaced
    set_threads(threads)
    with writing(out):
        store = write_dataset_store(split_list(datasets) or [], out, modalities=split_list(modalities),
                                    data_dir=data_dir)
    for note in store.notes:
        err.print(f"note: {note}", soft_wrap=True)
    parts = ", ".join(f"{s.dataset} {s.rows}" + (f" of {s.regions}" if s.rows < s.regions else "")
                      for s in store.sources)
    widths = ", ".join(f"{m} {d}-d" for m, d in store.dims.items())
    err.print(f"wrote a modality store of {store.n} locations ({parts}; {widths}) to {out}; pretrain on it with: "
              f"urbanprofile pretrain {out} --out CKPT/", soft_wrap=True)


def pretrain(
    store: Annotated[Path, typer.Argument(help="Modality store folder (store.json, <modality>.npy, "
                                          "<modality>.present.npy).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write (urbanfusion.safetensors "
                                      "and urbanfusion.json).")],
    epochs: Annotated[int, typer.Option("--epochs", help="Pretraining epochs.")] = 40,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Locations per (global) mini-batch.")] = 256,
    d_model: Annotated[int, typer.Option("--d-model", help="Token width.")] = 128,
    modalities: Annotated[str | None, typer.Option(
        "--modalities", help="Modalities to train on (default: every one in the store).", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="random_state.")] = 0,
    executor: Annotated[str, typer.Option("--executor", help="local (one process) or ray (Ray Train, "
                                          "data-parallel).")] = "local",
    workers: Annotated[int, typer.Option("--workers", help="Data-parallel workers with --executor ray (local: "
                                         "each batch split in as many shards, the same steps in one process).")] = 1,
    address: Annotated[str | None, typer.Option("--address", help="A running Ray cluster (auto or HOST:PORT); "
                                                "default: a local Ray for the run.", show_default=False)] = None,
    loader_workers: Annotated[int, typer.Option("--loader-workers", help="DataLoader processes reading the "
                                                "store.")] = 0,
    in_memory: Annotated[bool, typer.Option("--in-memory", help="Read the whole store into memory first (no "
                                            "data loader).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing checkpoint folder.")] = False,
    parents: Parents = False,
    threads: Threads = None,
) -> None:
    """Pretrain UrbanFusion on cached encoder outputs and write a safetensors checkpoint."""
    from urbanprofile.embedders.multimodal.pretraining import pretrain_checkpoint
    from urbanprofile.evaluation.large import peak_rss_gb

    check_output(out, parents=parents, overwrite=True, folder=True)  # an existing folder: see --overwrite below
    set_threads(threads)
    names = split_list(modalities)
    with writing(out):
        model = pretrain_checkpoint(store, out, executor=executor, workers=workers, address=address,
                                    in_memory=in_memory, overwrite=overwrite, epochs=epochs, batch_size=batch_size,
                                    d_model=d_model, train_modalities=tuple(names) if names else None,
                                    loader_workers=loader_workers, random_state=seed)
    per_epoch = sum(model.epoch_seconds_) / max(len(model.epoch_seconds_), 1)
    err.print(f"pretrained urbanfusion on {model.n_pretrain_regions_} locations ({', '.join(model.names_)}): "
              f"{len(model.loss_history_)} epochs, {per_epoch:.1f} s per epoch, final loss "
              f"{model.loss_history_[-1]:.4f}, peak memory {peak_rss_gb():.2f} GB; wrote {out}", soft_wrap=True)
