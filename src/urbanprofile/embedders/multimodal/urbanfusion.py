"""UrbanFusion: stochastic multimodal fusion of frozen modality encoders (Mühlematter et al., 2025).

Each modality of a region (see :mod:`urbanprofile.embedders.multimodal.modalities`: GeoCLIP location, MiniLM captions,
street-view captions, EfficientNet images, POI / land-use / mobility profiles) is encoded by a frozen
encoder, standardised, and projected to one ``d_model`` token (plus a learned modality embedding). A
Transformer encoder fuses the tokens that are present; the region vector is every trained modality's fused
token side by side (``readout="tokens"``, the default; an absent modality's slot is filled from the tokens
present) or their mean (``readout="mean"``).

Pretraining is Stochastic Multimodal Fusion (SMF): for every region of a minibatch two random non-empty
subsets of its available modalities are drawn (each modality kept with probability ``keep_prob``); the two
fused views are pulled together by a symmetric InfoNCE loss with a learnable temperature, and every
available modality's standardised embedding is reconstructed from each view (MSE, weight ``lambda_rec``:
the paper's summary gives about 0.06; the default here is 1.0, see the README's diagnosis: at 0.06 the
solved contrastive task keeps an identity code and loses what a probe needs). Several cities that share
modalities can be pooled (``pretrain``), and the target city may be left out (``include_target=False``: the
out-of-region setting). At inference any subset of the trained modalities can be used (``modalities``);
regions lacking one simply have one token less.

At scale, pretraining reads the cached encoder outputs from a modality store on disk (``pretrain_store``, see
:mod:`urbanprofile.embedders.multimodal.pretrain_store`) through a torch ``DataLoader`` over memory-mapped arrays,
in the same seeded batches as the in-memory path (same seed, same batches: the same model); with
:mod:`urbanprofile.embedders.multimodal.ray_pretrain` the same loop runs data-parallel on Ray Train.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.registry import load_dataset
from urbanprofile.embedders.base import Embedder, as_embedding
from urbanprofile.embedders.multimodal.modalities import (
    MODALITIES,
    RegionModalities,
    check_modalities,
    region_modalities,
)
from urbanprofile.embedders.multimodal.pretrain_store import (
    EpochBatches,
    ModalityStore,
    StoreBatches,
    batch_loader,
    moments,
    open_store,
    shard_bounds,
    standardise,
)
from urbanprofile.errors import DataError, MethodUnavailableError, TrainingError, unknown_name


def city_modalities(city: CityData, names: Sequence[str] | None, progress: bool = True) -> RegionModalities:
    """The city's region modalities, computed once per city object (kept in ``city.cache``)."""
    chosen = tuple(check_modalities(city, names))
    cached: dict[str, Any] = city.cache.setdefault("region_modalities", {})
    missing = [m for m in chosen if m not in cached]
    if missing:
        computed = region_modalities(city, missing, progress=progress)
        for m in missing:
            cached[m] = (computed.values[m], computed.present[m], computed.skipped.get(m, {}))
    out = RegionModalities(region_ids=city.region_ids)
    for m in chosen:
        out.values[m], out.present[m], skipped = cached[m]
        if skipped:
            out.skipped[m] = skipped
    return out


#: The files of a checkpoint folder (:meth:`UrbanFusionEmbedder.save_checkpoint`).
CHECKPOINT, CHECKPOINT_META = "urbanfusion.safetensors", "urbanfusion.json"
#: Region read-outs of the fused tokens.
READOUTS = ("mean", "tokens")


class UrbanFusionEmbedder(Embedder):
    """Transformer fusion of frozen modality encoders, pretrained with stochastic multimodal fusion.

    Args:
        modalities: Modalities used at inference (``None``: every trained modality the city has).
        train_modalities: Modalities used in pretraining (``None``: every modality the target city has).
        pretrain: Names of further datasets pooled into pretraining (e.g. the other CityView city).
        include_target: Whether the target city's regions are part of pretraining (``False``: pretrain only on
            ``pretrain`` and embed the target city, unseen).
        d_model: Token and region-vector width.
        n_layers: Transformer layers.
        n_heads: Attention heads.
        dropout: Dropout in the Transformer.
        epochs: Pretraining epochs (fixed; never chosen by looking at labels).
        batch_size: Regions per minibatch (the InfoNCE negatives).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        keep_prob: Probability that an available modality is kept in a view.
        lambda_rec: Weight of the reconstruction loss.
        temperature: Initial InfoNCE temperature (learned).
        readout: ``"tokens"`` (every trained modality's fused token side by side, ``d_model`` x modalities
            wide; the default) or ``"mean"`` (the mean of the present fused tokens, ``d_model`` wide).
        pretrain_store: A modality store folder (cached encoder outputs on disk): pretrain on its locations,
            read through a ``DataLoader`` in seeded mini-batches, instead of on the cities' modalities in memory
            (``pretrain`` and ``include_target`` then do not apply; the city is only embedded).
        loader_workers: ``DataLoader`` worker processes reading the store (0: read in the training process).
        shards: Split each mini-batch into this many equal parts, each with its own loss, and average their
            gradients: the single-process twin of data-parallel training on ``shards`` workers
            (:mod:`~urbanprofile.embedders.multimodal.ray_pretrain`). 1 (the default) is the ordinary loop.
        random_state: Seed.
    """

    on_epoch: Callable[[int, int], None] | None = None

    def __init__(
        self,
        modalities: Sequence[str] | None = None,
        train_modalities: Sequence[str] | None = None,
        pretrain: Sequence[str] = (),
        include_target: bool = True,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        epochs: int = 40,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        keep_prob: float = 0.5,
        lambda_rec: float = 1.0,
        temperature: float = 0.07,
        readout: str = "tokens",
        pretrain_store: str | None = None,
        loader_workers: int = 0,
        shards: int = 1,
        random_state: int | None = None,
    ) -> None:
        self.modalities = modalities
        self.train_modalities = train_modalities
        self.pretrain = pretrain
        self.include_target = include_target
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.keep_prob = keep_prob
        self.lambda_rec = lambda_rec
        self.temperature = temperature
        self.readout = readout
        self.pretrain_store = pretrain_store
        self.loader_workers = loader_workers
        self.shards = shards
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------------------
    def _validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob must be in (0, 1], got {self.keep_prob}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if self.lambda_rec < 0 or self.temperature <= 0:
            raise ValueError("lambda_rec must be >= 0 and temperature > 0")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if not self.include_target and not self.pretrain and self.pretrain_store is None:
            raise ValueError("include_target=False needs at least one dataset in pretrain")
        if self.pretrain_store is not None and self.pretrain:
            raise ValueError("give pretrain (datasets pooled in memory) or pretrain_store (on disk), not both")
        if self.loader_workers < 0 or self.shards < 1 or self.batch_size < 2 * self.shards:
            raise ValueError("loader_workers must be >= 0, shards >= 1 and batch_size >= 2 * shards")

    def fit(self, city: CityData) -> UrbanFusionEmbedder:
        self._validate()
        if self.pretrain_store is not None:
            store = open_store(self.pretrain_store)
            self.names_ = self._store_names(store)
            self.dims_ = {m: store.dims[m] for m in self.names_}
            if self.modalities is not None:
                self._check_inference_names(self.modalities)
            return self.fit_store(store)
        names = check_modalities(city, self.train_modalities)
        if self.modalities is not None:
            unknown = [m for m in self.modalities if m not in names]
            if unknown:
                raise MethodUnavailableError(f"inference modality {unknown[0]!r} is not among the trained {names}")
        sources = [city_modalities(city, names)] if self.include_target else []
        for other in self.pretrain:
            other_city = load_dataset(other)
            have = [m for m in names if m in check_modalities(other_city, None)]
            sources.append(city_modalities(other_city, have))
        # Pool the cities: a modality a city lacks (or with another width) is absent for all its regions.
        dims = {m: sources[0].values[m].shape[1] if m in sources[0].values else None for m in names}
        for src in sources:
            for m in names:
                if dims[m] is None and m in src.values:
                    dims[m] = src.values[m].shape[1]
        self.names_ = [m for m in names if dims[m] is not None]
        self.dims_ = {m: int(dims[m] or 0) for m in self.names_}
        x, present = self._pool(sources)
        return self.fit_store(ModalityStore.from_arrays(x, present))

    def _store_names(self, store: ModalityStore) -> list[str]:
        if self.train_modalities is None:
            return list(store.names)
        for m in self.train_modalities:
            if m not in MODALITIES:
                raise unknown_name("modality", m, MODALITIES)
            if m not in store.names:
                raise DataError(f"{store.folder}: the store has no {m!r} modality (it has: {', '.join(store.names)})")
        return list(dict.fromkeys(self.train_modalities))

    def _check_inference_names(self, names: Sequence[str]) -> None:
        unknown = [m for m in names if m not in self.names_]
        if unknown:
            raise MethodUnavailableError(f"inference modality {unknown[0]!r} is not among the trained {self.names_}")

    def fit_store(self, store: ModalityStore) -> UrbanFusionEmbedder:
        """Pretrain on a store's locations (``names_`` and ``dims_`` set): in memory if the store is held in
        memory (:meth:`ModalityStore.from_arrays`), else through a ``DataLoader`` over the memory-mapped files.
        """
        import torch

        self.fit_standardisation(store)
        torch.manual_seed(0 if self.random_state is None else int(self.random_state))
        rng = np.random.default_rng(self.random_state)
        self.model_ = _build_model(self.dims_, self.names_, self.d_model, self.n_layers, self.n_heads, self.dropout,
                                   self.temperature)
        opt = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.train_epochs(smf_objective(self.model_, self.lambda_rec), opt, self.batch_source(store), store.n, rng)
        return self

    def train_epochs(self, objective: Any, opt: Any, batches: Callable[[np.ndarray], Any], n: int,
                     rng: np.random.Generator, shard: int | None = None,
                     mean_over_workers: Callable[[float], float] | None = None) -> None:
        """The pretraining epochs (sets ``loss_history_``, ``epoch_seconds_``, ``train_seconds_``; model left in eval).

        Args:
            objective: :func:`smf_objective` of ``model_``, or its DDP wrapper.
            opt: The optimiser.
            batches: From an epoch's permutation to its mini-batches (:meth:`batch_source`, for ``shard``).
            n: Number of pretraining locations.
            rng: The generator of the permutations and the views (seeded alike in every worker).
            shard: This data-parallel worker's part of each batch (``None``: one process).
            mean_over_workers: Averages an epoch's loss over the workers (data-parallel only).
        """
        self.loss_history_: list[float] = []
        self.epoch_seconds_: list[float] = []
        start = time.perf_counter()
        objective.train()
        for epoch in range(self.epochs):
            began = time.perf_counter()
            total, steps = 0.0, 0
            for step, (parts, avail) in enumerate(batches(rng.permutation(n))):
                loss = smf_step(objective, opt, parts, avail, rng, self.keep_prob, shards=self.shards,
                                seed=self._step_seed(epoch, step), shard=shard)
                if loss is None:
                    continue
                if not np.isfinite(loss):
                    raise TrainingError(f"urbanfusion: loss became {loss} at epoch {epoch + 1}")
                total += loss
                steps += 1
            average = total / max(steps, 1)
            self.loss_history_.append(mean_over_workers(average) if mean_over_workers else average)
            self.epoch_seconds_.append(time.perf_counter() - began)
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, self.epochs)
        objective.eval()
        self.train_seconds_ = time.perf_counter() - start
        self.n_pretrain_regions_ = int(n)

    def _step_seed(self, epoch: int, step: int) -> int | None:
        """Dropout seed of a sharded step (each shard reseeds, as each data-parallel worker would); None: unsharded."""
        if self.shards == 1:
            return None
        return step_seed(self.random_state, epoch, step)

    def fit_standardisation(self, store: ModalityStore) -> None:
        """``mean_`` and ``scale_`` per modality from the present rows of ``store`` (read in chunks)."""
        self.mean_, self.scale_ = {}, {}
        for m in self.names_:
            mean, std, count = moments(store.values[m], store.present[m])
            if count == 0:
                raise MethodUnavailableError(f"no region has the {m!r} modality in the pretraining data")
            self.mean_[m] = mean.astype(np.float32)
            self.scale_[m] = (std + 1e-6).astype(np.float32)

    def batch_source(self, store: ModalityStore, shard: int | None = None) -> Callable[[np.ndarray], Any]:
        """A function from an epoch's permutation to its mini-batches ``(parts, mask)``.

        Each batch is cut into ``shards`` contiguous parts; ``parts`` maps a part's number to its features (one
        tensor per modality), ``mask`` is the presence of every modality over the whole batch (the views are drawn
        over it). Only part ``shard``'s features are read (a data-parallel worker's), or every part's if ``None``.
        """
        import torch

        wanted = list(range(self.shards)) if shard is None else [shard]
        if store.folder is None:  # held in memory: standardise once, index tensors
            xs = [torch.from_numpy(self.standardise(m, store.values[m])) for m in self.names_]
            pres = torch.from_numpy(np.column_stack([store.present[m] for m in self.names_]))

            def in_memory(order: np.ndarray) -> Any:
                for begin in range(0, len(order), self.batch_size):
                    idx = torch.from_numpy(order[begin:begin + self.batch_size])
                    bounds = shard_bounds(len(idx), self.shards)
                    yield {k: [v[idx[bounds[k][0]:bounds[k][1]]] for v in xs] for k in wanted}, pres[idx]

            return in_memory
        sampler = EpochBatches(self.batch_size)
        dataset = StoreBatches(store, self.names_, self.mean_, self.scale_, shards=self.shards, parts=wanted)
        loader = batch_loader(dataset, sampler, self.loader_workers)

        def from_disk(order: np.ndarray) -> Any:
            sampler.set_order(order)
            yield from loader

        return from_disk

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write the pretrained model: ``urbanfusion.safetensors`` (weights, standardisation) and ``urbanfusion.json``.

        No pickle: tensors in safetensors, everything else JSON. :meth:`from_checkpoint` reads it back.
        """
        from safetensors.torch import save_file

        self._check_fitted("model_")
        root = Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model_.state_dict().items()}
        for m in self.names_:
            tensors[f"mean.{m}"] = _tensor(self.mean_[m])
            tensors[f"scale.{m}"] = _tensor(self.scale_[m])
        save_file(tensors, str(root / CHECKPOINT))
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        meta = {"params": params, "names": self.names_, "dims": self.dims_,
                "loss_history": getattr(self, "loss_history_", []),
                "epoch_seconds": getattr(self, "epoch_seconds_", []),
                "n_pretrain_regions": getattr(self, "n_pretrain_regions_", None)}
        (root / CHECKPOINT_META).write_text(json.dumps(meta, indent=1) + "\n")
        return root

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> UrbanFusionEmbedder:
        """A fitted embedder read from :meth:`save_checkpoint`'s folder (``transform`` embeds any city that has
        the trained modalities).

        Raises:
            DataError: The folder lacks a file, or the files do not describe an UrbanFusion model.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(folder)
        try:
            meta = json.loads((root / CHECKPOINT_META).read_text())
            tensors = load_file(str(root / CHECKPOINT))
            embedder = cls(**{k: v for k, v in meta["params"].items() if k in cls().get_params()})
            embedder.names_, embedder.dims_ = list(meta["names"]), {k: int(v) for k, v in meta["dims"].items()}
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise DataError(f"{root}: not an urbanfusion checkpoint ({err})") from None
        embedder.mean_ = {m: tensors[f"mean.{m}"].numpy() for m in embedder.names_}
        embedder.scale_ = {m: tensors[f"scale.{m}"].numpy() for m in embedder.names_}
        embedder.model_ = _build_model(embedder.dims_, embedder.names_, embedder.d_model, embedder.n_layers,
                                       embedder.n_heads, embedder.dropout, embedder.temperature)
        state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        try:
            embedder.model_.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise DataError(f"{root}: the weights do not fit the described model ({first})") from None
        embedder.model_.eval()
        embedder.loss_history_ = list(meta.get("loss_history", []))
        return embedder

    def _pool(self, sources: list[RegionModalities]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        x: dict[str, list[np.ndarray]] = {m: [] for m in self.names_}
        present: dict[str, list[np.ndarray]] = {m: [] for m in self.names_}
        for src in sources:
            n = len(src.region_ids)
            for m in self.names_:
                ok = m in src.values and src.values[m].shape[1] == self.dims_[m]
                x[m].append(src.values[m] if ok else np.full((n, self.dims_[m]), np.nan, np.float32))
                present[m].append(src.present[m] if ok else np.zeros(n, bool))
        return ({m: np.concatenate(v) for m, v in x.items()}, {m: np.concatenate(v) for m, v in present.items()})

    def standardise(self, m: str, values: np.ndarray) -> np.ndarray:
        """Scale one modality's features as in training (absent rows become 0, which the mask hides).

        Args:
            m: Modality name, one of ``names_``.
            values: Its raw features, ``(n_regions, width)``.

        Returns:
            float32 features, standardised with the training mean and scale and clipped to ±10.
        """
        return standardise(values, self.mean_[m], self.scale_[m])

    # -- inference ----------------------------------------------------------------------------------
    def transform(self, city: CityData) -> pd.DataFrame:
        import torch

        self._check_fitted("model_")
        names = list(self.modalities) if self.modalities is not None else [
            m for m in self.names_ if m in check_modalities(city, None)]
        unknown = [m for m in names if m not in self.names_]
        if unknown:
            raise MethodUnavailableError(f"modality {unknown[0]!r} was not trained (trained: {self.names_})")
        feats = city_modalities(city, names)
        for m in names:  # a model pretrained on a store of other encoders' outputs meets this city's
            if feats.values[m].shape[1] != self.dims_[m]:
                raise DataError(f"{city.name}: modality {m!r} is {feats.values[m].shape[1]}-d here, the model was "
                                f"pretrained on {self.dims_[m]}-d")
        mask = np.column_stack([feats.present[m] if m in names else np.zeros(city.n_regions, bool)
                                for m in self.names_])
        empty = ~mask.any(1)
        if empty.any():
            raise MethodUnavailableError(
                f"{int(empty.sum())} region(s) of {city.name} (e.g. {city.region_ids[int(np.argmax(empty))]}) have "
                f"none of the modalities {names}; add one they all have (e.g. location)"
            )
        xs = [torch.from_numpy(self.standardise(m, feats.values[m]) if m in names
                               else np.zeros((city.n_regions, self.dims_[m]), np.float32)) for m in self.names_]
        self.modalities_used_ = names
        self.skipped_ = feats.skipped
        out = []
        with torch.inference_mode():
            for begin in range(0, city.n_regions, 1024):
                sl = slice(begin, begin + 1024)
                out.append(self.model_([v[sl] for v in xs], torch.from_numpy(mask[sl]),
                                       readout=self.readout).numpy())
        return as_embedding(np.concatenate(out), city.region_ids)


def _tensor(values: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def step_seed(random_state: int | None, epoch: int, step: int) -> int:
    """The dropout seed of one sharded step: the same in every worker and in the single-process twin."""
    seq = np.random.SeedSequence([0 if random_state is None else int(random_state), epoch, step])
    return int(seq.generate_state(1)[0])


def smf_loss(model: Any, batch: list[Any], avail: Any, view1: Any, view2: Any, lambda_rec: float) -> Any:
    """The SMF objective on one batch: symmetric InfoNCE between two views plus their reconstruction loss."""
    fused1, fused2 = model(batch, view1), model(batch, view2)
    loss = model.contrastive(fused1, fused2)
    if lambda_rec > 0:
        rec = (model.reconstruction(fused1, batch, avail) + model.reconstruction(fused2, batch, avail)) / 2
        loss = loss + lambda_rec * rec
    return loss


def smf_objective(model: Any, lambda_rec: float) -> Any:
    """The SMF loss as a module around ``model`` (so that DDP sees the whole step as one forward)."""
    from torch import nn

    class Objective(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fusion = model

        def forward(self, batch: list[Any], avail: Any, view1: Any, view2: Any) -> Any:
            return smf_loss(self.fusion, batch, avail, view1, view2, lambda_rec)

    return Objective()


def smf_step(objective: Any, opt: Any, parts: dict[int, list[Any]], avail: Any, rng: np.random.Generator,
             keep_prob: float, *, shards: int = 1, seed: int | None = None, shard: int | None = None) -> float | None:
    """One optimiser step of stochastic multimodal fusion; the loss, or ``None`` if the batch was skipped.

    The two views are drawn for the whole batch from ``rng`` (so every data-parallel worker draws the same). With
    ``shards > 1`` the batch is cut into contiguous parts, each part's loss computed with dropout reseeded from
    ``seed`` and the part's number, and the gradients averaged: in one process over every part (``shard`` None),
    or, in a data-parallel worker, over this worker's part ``shard`` alone, DDP averaging across workers (the
    loss returned is then this worker's part's).

    Args:
        objective: :func:`smf_objective` of the model, or its DDP wrapper.
        parts: The features (one tensor per modality) of each part this process computes, by part number
            (:func:`~urbanprofile.embedders.multimodal.pretrain_store.shard_bounds` of the batch): part 0 only
            when ``shards`` is 1, part ``shard`` alone in a data-parallel worker.
        avail: ``(batch, modalities)`` presence over the whole batch, every part's rows.
    """
    import torch

    n = len(avail)
    bounds = shard_bounds(n, shards)
    if min(end - begin for begin, end in bounds) < 2:  # InfoNCE needs two rows; every worker skips alike
        return None
    view1, view2 = _subset(avail, keep_prob, rng), _subset(avail, keep_prob, rng)
    if shards == 1:
        loss = objective(parts[0], avail, view1, view2)
        value = loss
    else:
        losses = []
        for k in (range(shards) if shard is None else [shard]):
            begin, end = bounds[k]
            torch.manual_seed((seed or 0) + k)
            losses.append(objective(parts[k], avail[begin:end], view1[begin:end], view2[begin:end]))
        loss = torch.stack(losses).mean()
        value = loss
    if not torch.isfinite(value):
        return float(value.item())
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        getattr(objective, "module", objective).fusion.logit_scale.clamp_(0, np.log(100.0))
    return float(value.item())


def _subset(avail: Any, keep_prob: float, rng: np.random.Generator) -> Any:
    """A random non-empty subset of each row's available modalities (boolean (B, M))."""
    import torch

    avail_np = avail.numpy()
    keep = (rng.random(avail_np.shape) < keep_prob) & avail_np
    for row in np.where(~keep.any(1))[0]:
        choices = np.flatnonzero(avail_np[row])
        keep[row, rng.choice(choices)] = True
    return torch.from_numpy(keep)


def _build_model(dims: dict[str, int], names: list[str], d_model: int, n_layers: int, n_heads: int,
                 dropout: float, temperature: float) -> Any:
    import torch
    from torch import nn

    class Fusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.ModuleList(nn.Sequential(nn.Linear(dims[m], d_model), nn.LayerNorm(d_model))
                                         for m in names)
            self.modality = nn.Parameter(torch.randn(len(names), d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True,
                                               norm_first=True)
            self.fusion = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
            self.decode = nn.ModuleList(nn.Linear(d_model, dims[m]) for m in names)
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / temperature))))

        def forward(self, xs: list[torch.Tensor], mask: torch.Tensor, readout: str = "mean") -> torch.Tensor:
            tokens = torch.stack([p(x) for p, x in zip(self.project, xs, strict=True)], dim=1) + self.modality
            fused = self.fusion(tokens, src_key_padding_mask=~mask)
            if readout == "tokens":
                return fused.reshape(len(fused), -1)
            weights = mask.unsqueeze(-1).to(fused.dtype)
            return (fused * weights).sum(1) / weights.sum(1).clamp(min=1.0)

        def contrastive(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ha = nn.functional.normalize(self.head(a), dim=-1)
            hb = nn.functional.normalize(self.head(b), dim=-1)
            logits = ha @ hb.T * self.logit_scale.exp()
            target = torch.arange(len(a))
            return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2

        def reconstruction(self, fused: torch.Tensor, xs: list[torch.Tensor], avail: torch.Tensor) -> torch.Tensor:
            losses = []
            for k, dec in enumerate(self.decode):
                rows = avail[:, k]
                if rows.any():
                    losses.append(((dec(fused[rows]) - xs[k][rows]) ** 2).mean())
            return torch.stack(losses).mean()

    return Fusion()
