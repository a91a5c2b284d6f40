"""UrbanFusion pretraining data-parallel on Ray Train: N torch workers, gradients averaged by DDP (gloo, CPU).

Every worker opens the same modality store (:mod:`~urbanprofile.embedders.multimodal.pretrain_store`; on a cluster
it must sit on storage every node reads at the same path), builds the model from the same seed, and walks the
same seeded permutation of locations: each global mini-batch of ``batch_size`` locations is cut into
``num_workers`` contiguous parts, the two modality views are drawn for the whole batch from the shared seeded
generator (over every row's presence mask, which is all a worker reads of the other parts), and worker ``k`` reads
the features of part ``k``'s rows and computes their loss (its dropout reseeded from the seed, the epoch, the
step and ``k``). DDP averages the gradients, so a step is the step of ``UrbanFusionEmbedder(shards=num_workers)``
in one process, up to the order of floating-point sums (see ``tests/embedders/multimodal/test_ray_train.py``).

Rank 0 writes the weights as safetensors into the run's checkpoint; the driver reads them back. Nothing of the
model is pickled (Ray carries the configuration: numbers, names and the store's path).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile.embedders.multimodal.pretrain_store import open_store
from urbanprofile.embedders.multimodal.urbanfusion import (
    CHECKPOINT,
    UrbanFusionEmbedder,
    _build_model,
    smf_objective,
)
from urbanprofile.errors import TrainingError, UrbanProfileError, require

#: Restarts of the worker group after a failure (a lost worker, a rendezvous port taken meanwhile): each restart
#: trains from the beginning, and the run is seeded, so the result is the same.
RETRIES = 2


def pretrain_on_ray(embedder: UrbanFusionEmbedder, store: str | Path, num_workers: int = 2,
                    address: str | None = None) -> UrbanFusionEmbedder:
    """Pretrain ``embedder`` on a modality store with Ray Train's ``TorchTrainer``.

    Args:
        embedder: The (unfitted) embedder: its parameters set the model and the training; ``shards`` is taken
            as ``num_workers`` and ``loader_workers`` applies in each worker.
        store: The modality store folder.
        num_workers: Data-parallel workers (one CPU each).
        address: A running Ray cluster (``auto`` or ``HOST:PORT``); ``None`` starts a local Ray for the run.

    Returns:
        ``embedder``, fitted (its ``model_`` holds rank 0's weights after the last step).

    Raises:
        TrainingError: The workers failed ``RETRIES + 1`` times (one line with the last reason).
    """
    ray = require("ray", "ray")
    require("ray.train.torch", "ray")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise UrbanProfileError(f"num_workers must be >= 1, got {num_workers}")
    embedder.shards = num_workers
    embedder.pretrain_store = str(Path(store).resolve())
    embedder._validate()
    opened = open_store(store)
    embedder.names_ = embedder._store_names(opened)
    embedder.dims_ = {m: opened.dims[m] for m in embedder.names_}
    embedder.fit_standardisation(opened)
    config = {"params": {k: v for k, v in embedder.get_params().items() if k != "pretrain_store"},
              "store": embedder.pretrain_store, "names": embedder.names_, "dims": embedder.dims_,
              "mean": {m: embedder.mean_[m].tolist() for m in embedder.names_},
              "scale": {m: embedder.scale_[m].tolist() for m in embedder.names_}}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False, **({"num_cpus": num_workers} if address is None else {}))
    began = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="urbanfusion-ray-") as runs:
            trainer = TorchTrainer(
                _worker, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                             resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name="urbanfusion", storage_path=runs,
                                     failure_config=FailureConfig(max_failures=RETRIES),
                                     checkpoint_config=CheckpointConfig(num_to_keep=1)))
            try:
                result = trainer.fit()
            except Exception as err:  # Ray wraps a worker's exception in its own error types
                raise TrainingError(f"urbanfusion on Ray: training failed ({_first_line(err)})") from None
            if result.checkpoint is None:
                raise TrainingError("urbanfusion on Ray: the run ended without a checkpoint")
            with result.checkpoint.as_directory() as folder:
                _load_weights(embedder, Path(folder) / CHECKPOINT)
            metrics = result.metrics or {}
    finally:
        if started:
            ray.shutdown()
    embedder.loss_history_ = [float(v) for v in metrics.get("loss_history", [])]
    embedder.epoch_seconds_ = [float(v) for v in metrics.get("epoch_seconds", [])]
    embedder.train_seconds_ = time.perf_counter() - began
    embedder.n_pretrain_regions_ = opened.n
    return embedder


def _first_line(err: BaseException) -> str:
    cause: BaseException = err
    while cause.__cause__ is not None:  # the worker's own error is at the bottom of Ray's chain
        cause = cause.__cause__
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


def _load_weights(embedder: UrbanFusionEmbedder, path: Path) -> None:
    from safetensors.torch import load_file

    embedder.model_ = _build_model(embedder.dims_, embedder.names_, embedder.d_model, embedder.n_layers,
                                   embedder.n_heads, embedder.dropout, embedder.temperature)
    embedder.model_.load_state_dict(load_file(str(path)))
    embedder.model_.eval()


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the loop of ``UrbanFusionEmbedder.fit_store`` on its part of every batch."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    embedder = UrbanFusionEmbedder(**config["params"])
    embedder.names_, embedder.dims_ = list(config["names"]), dict(config["dims"])
    embedder.mean_ = {m: np.asarray(v, dtype=np.float32) for m, v in config["mean"].items()}
    embedder.scale_ = {m: np.asarray(v, dtype=np.float32) for m, v in config["scale"].items()}
    store = open_store(config["store"])
    torch.manual_seed(0 if embedder.random_state is None else int(embedder.random_state))
    rng = np.random.default_rng(embedder.random_state)
    model = _build_model(embedder.dims_, embedder.names_, embedder.d_model, embedder.n_layers, embedder.n_heads,
                         embedder.dropout, embedder.temperature)
    # A modality absent from one worker's part leaves its decoder without a gradient there.
    objective = DistributedDataParallel(smf_objective(model, embedder.lambda_rec), find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=embedder.lr, weight_decay=embedder.weight_decay)

    def mean_over_workers(value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total.item()) / world

    embedder.train_epochs(objective, opt, embedder.batch_source(store, shard=rank), store.n, rng, shard=rank,
                          mean_over_workers=mean_over_workers)
    metrics = {"loss_history": embedder.loss_history_, "epoch_seconds": embedder.epoch_seconds_}
    with tempfile.TemporaryDirectory() as folder:
        if rank == 0:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      str(Path(folder) / CHECKPOINT))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)
