"""Evaluation protocols (paper, nested, spatial) applied to a region embedding, with geographic bias.

A protocol is a :class:`Protocol` object in a registry (:func:`get_protocol`, :func:`register_protocol`, or an
``urbanprofile.protocols`` entry point). It knows its outer splits, the groups of its inner CV, its probe
policy (the peers' fixed probe settings, or settings chosen by inner CV) and what it can run on; heads and the
runner ask it rather than compare its name. It knows nothing about any method: it receives an embedding
(a DataFrame indexed by ``region_id``) and the kind of head to probe it with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold

from urbanprofile.data.city import CityData
from urbanprofile.data.tasks import TaskData, task_data
from urbanprofile.errors import DataError, MethodUnavailableError, UrbanProfileError
from urbanprofile.evaluation.large import FoldProgress
from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.evaluation.spatial import BLOCK_SEED, adjacency_weights, morans_i, spatial_blocks
from urbanprofile.heads.prompts import prompt_vectors
from urbanprofile.heads.registry import HeadSpec, build_head, embedding_blocks, head_unavailable_reason, parse_head
from urbanprofile.registry import Registry

#: Folds of the spatial protocol; each holds whole blocks.
N_SPATIAL_FOLDS = 5
#: Blocks per-block bias is measured on (large areas: a fifth of the city each).
N_BIAS_BLOCKS = 5
#: About this many regions per block of the spatial protocol, with 5 to 50 blocks in all.
REGIONS_PER_BLOCK = 20
#: Fewest labelled training regions a probe may be fit on when a fold is subsampled: the inner CV's 5 folds
#: each need one region to validate on and four to fit on.
MIN_TRAIN_REGIONS = 5


def n_spatial_blocks(n_regions: int) -> int:
    """Blocks of the spatial protocol: ~20 regions each (NYC 9, Chicago 5, a CityView city 50)."""
    return int(np.clip(round(n_regions / REGIONS_PER_BLOCK), N_SPATIAL_FOLDS, 50))


@dataclass
class ProtocolResult:
    """Pooled out-of-fold predictions of one (task, protocol) with metrics and bias figures."""

    task: str
    protocol: str
    region_ids: pd.Index
    y: np.ndarray
    pred: np.ndarray
    fold: np.ndarray
    metrics: dict[str, float]
    bias: dict[str, Any]
    chosen: list[dict[str, Any]] = field(default_factory=list)
    head_seconds: float = 0.0
    task_info: str = ""
    head: str = "ridge"
    #: Share of each outer training fold the probe was fit on (1.0: the whole fold).
    train_fraction: float = 1.0
    #: Labelled training regions per outer fold.
    n_train: list[int] = field(default_factory=list)
    #: Per outer fold, the candidate embedding chosen and the fitted head (``keep_heads=True`` only): the fold
    #: models that CV+ intervals put around a new region.
    fold_heads: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def n_regions(self) -> int:
        return len(self.y)

    def predictions(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            {"y": self.y, "pred": self.pred, "residual": self.y - self.pred, "fold": self.fold},
            index=self.region_ids,
        )
        frame.index.name = "region_id"
        return frame


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: its folds, its probe policy and what it can run on.

    Attributes:
        name: Registry name (stored with every result row).
        description: One line for the user.
        fixed_probe: The probe policy: ``True`` for the peers' fixed probe settings (no inner CV, training
            checkpoints ignored), ``False`` for settings chosen by inner CV on each outer training fold.
        spatial_folds: Outer folds of whole k-means blocks of centroids, inner CV grouped by block (needs
            region locations); ``False``: the dataset's own folds (``paper_folds``).
        block_seed: Seed of the block layout and of dealing blocks to folds (spatial folds only). Every stored
            result uses the default; another seed is another draw of held-out areas, for studies of how much a
            figure depends on the one layout (``dataclasses.replace(get_protocol("spatial"), block_seed=1)``).
    """

    name: str
    description: str
    fixed_probe: bool = False
    spatial_folds: bool = False
    block_seed: int = BLOCK_SEED

    def unavailable_reason(self, city: CityData) -> str | None:
        """Why this protocol cannot run on ``city`` (one line), or ``None`` when it can."""
        if self.spatial_folds and not city.has_locations:
            return f"{self.name} protocol needs region locations; {city.name!r} has none"
        return None

    def check_available(self, city: CityData) -> None:
        reason = self.unavailable_reason(city)
        if reason:
            raise MethodUnavailableError(reason)

    def head_unavailable_reason(self, head: str) -> str | None:
        """Why ``head`` has no estimator under this protocol's probe policy, or ``None`` when it has one."""
        return head_unavailable_reason(head, self.fixed_probe)

    def splits(self, city: CityData, task: TaskData) -> list[tuple[np.ndarray, np.ndarray]]:
        """Outer folds as index arrays into the task's regions."""
        n = len(task.y)
        if self.spatial_folds:
            n_blocks = n_spatial_blocks(city.n_regions)
            blocks = _task_blocks(city, task, n_blocks, self.block_seed)
            # Deal whole blocks to folds in a fixed shuffled order, so no block is split across folds.
            fold_of_block = np.random.default_rng(self.block_seed).permutation(n_blocks) % N_SPATIAL_FOLDS
            folds = fold_of_block[blocks]
            return [(np.where(folds != f)[0], np.where(folds == f)[0]) for f in np.unique(folds)]
        settings = city.meta.get("paper_folds", {"n_splits": 10, "shuffle": True, "random_state": 2024})
        n_splits = min(int(settings["n_splits"]), n)
        shuffle = bool(settings["shuffle"])
        splitter = KFold(n_splits=n_splits, shuffle=shuffle,
                         random_state=settings["random_state"] if shuffle else None)
        return list(splitter.split(np.zeros(n)))

    def inner_groups(self, city: CityData, task: TaskData) -> np.ndarray | None:
        """Groups of the task's regions for the inner CV of the heads (``None``: ungrouped folds)."""
        if not self.spatial_folds:
            return None
        return _task_blocks(city, task, n_spatial_blocks(city.n_regions), self.block_seed)


#: Every protocol; plug-ins come from the ``urbanprofile.protocols`` entry-point group (a ``Protocol``).
PROTOCOL_REGISTRY: Registry[Protocol] = Registry("protocol", "urbanprofile.protocols", name_of=lambda p: p.name,
                                                 accepts=lambda obj: isinstance(obj, Protocol))


def register_protocol(protocol: Protocol, replace: bool = False) -> Protocol:
    """Add a protocol (``replace=True`` to override one of the same name)."""
    return PROTOCOL_REGISTRY.register(protocol.name, protocol, replace=replace)


for _protocol in (
    Protocol("paper", "the peers' protocol: Ridge(alpha=1) on the raw embedding, their folds; for comparison only",
             fixed_probe=True),
    Protocol("nested", "same outer folds; alpha, scaling and log1p target chosen by inner CV on training folds"),
    Protocol("spatial", "spatial block 5-fold (whole k-means blocks of centroids per fold); inner CV grouped by "
             "block", spatial_folds=True),
):
    register_protocol(_protocol)


class _Descriptions(Mapping[str, str]):
    """Every registered protocol's description by name, read live from the registry."""

    def __getitem__(self, name: str) -> str:
        return get_protocol(name).description

    def __iter__(self) -> Iterator[str]:
        return iter(PROTOCOL_REGISTRY.names())

    def __len__(self) -> int:
        return len(PROTOCOL_REGISTRY.names())


#: Protocol name -> one-line description, in registration order.
PROTOCOLS: Mapping[str, str] = _Descriptions()


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The protocol object of a name (an object is returned as is), or a one-line error with "did you mean"."""
    return protocol if isinstance(protocol, Protocol) else PROTOCOL_REGISTRY.get(protocol)


def check_protocol(protocol: str) -> None:
    get_protocol(protocol)


def protocol_unavailable_reason(head: str, protocol: str) -> str | None:
    """Why ``head`` has no estimator under ``protocol`` (``None`` when it has one)."""
    return get_protocol(protocol).head_unavailable_reason(head)


def outer_splits(city: CityData, task: TaskData, protocol: str | Protocol) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer folds as index arrays into the task's regions."""
    return get_protocol(protocol).splits(city, task)


def check_train_fraction(train_fraction: float) -> None:
    """A share of the outer training folds must be a number in (0, 1]."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, int | float) or not (
            math.isfinite(train_fraction) and 0 < train_fraction <= 1):
        raise UrbanProfileError(f"train fraction must be in (0, 1] (a share of each outer training fold), "
                                f"got {train_fraction!r}")


def subsample_train(
    train: np.ndarray, train_fraction: float, random_state: int | None, fold: int,
    groups: np.ndarray | None = None, where: str = "",
) -> np.ndarray:
    """The labelled regions a probe is fit on: a seeded share of one outer training fold.

    One permutation per (seed, fold) is cut at the share, so the subsets of one seed are nested (10% inside 25%
    inside 50%) and every method sees the same regions. The whole fold (``train_fraction=1``) is ``train`` itself,
    untouched, so its figures are the protocol's own.

    Args:
        train: Index array of the fold's training regions.
        train_fraction: Share in (0, 1].
        random_state: Seed of the draw (``None`` draws with seed 0, so the result is still reproducible).
        fold: The outer fold's number (each fold draws its own subset).
        groups: Spatial blocks of ``train`` (the spatial protocol's inner CV must see at least two).
        where: ``dataset task protocol`` for error messages.

    Raises:
        UrbanProfileError: A share outside (0, 1], fewer than :data:`MIN_TRAIN_REGIONS` regions kept, or (spatial)
            a subset inside one block.
    """
    check_train_fraction(train_fraction)
    if train_fraction == 1:
        return train
    seed = 0 if random_state is None else int(random_state)
    order = np.random.default_rng([seed, fold]).permutation(len(train))
    n_keep = math.ceil(train_fraction * len(train))
    if n_keep < MIN_TRAIN_REGIONS:
        raise UrbanProfileError(f"{where}: train fraction {train_fraction:g} keeps {n_keep} of {len(train)} training "
                                f"regions in outer fold {fold}; the inner CV needs at least {MIN_TRAIN_REGIONS}")
    keep = np.sort(order[:n_keep])
    if groups is not None and len(np.unique(groups[keep])) < 2:
        raise UrbanProfileError(f"{where}: train fraction {train_fraction:g} keeps regions of one spatial block in "
                                f"outer fold {fold}; the spatial inner CV needs two blocks")
    return train[keep]


def _task_blocks(city: CityData, task: TaskData, n_blocks: int, seed: int = BLOCK_SEED) -> np.ndarray:
    blocks = pd.Series(spatial_blocks(city, n_blocks, seed), index=city.region_ids)
    return blocks.loc[task.region_ids].to_numpy()


def fit_best_candidate(
    matrices: dict[str, np.ndarray], rows: np.ndarray, y: np.ndarray, groups: np.ndarray | None,
    build: Callable[[], Any],
) -> tuple[str, Any]:
    """Fit a fresh head (``build()``) on ``rows`` of each candidate embedding and keep the one with the lowest
    inner-CV error (a training checkpoint chosen on training labels only); one candidate is simply fit.

    Returns:
        The chosen candidate's label and its fitted head.
    """
    fits = {label: build().fit(X[rows], y[rows], groups=groups) for label, X in matrices.items()}
    label = min(fits, key=lambda name: fits[name].cv_error_) if len(fits) > 1 else next(iter(fits))
    return label, fits[label]


def evaluate_embedding(
    city: CityData,
    embedding: pd.DataFrame,
    task: str,
    protocol: str | Protocol = "nested",
    head: str = "ridge",
    random_state: int | None = 0,
    candidates: dict[str, pd.DataFrame] | None = None,
    train_fraction: float = 1.0,
    keep_heads: bool = False,
) -> ProtocolResult:
    """Cross-validate a probe on an embedding and measure its error and geographic bias.

    Args:
        city: The city (targets, locations, folds settings).
        embedding: One row per region, indexed by ``region_id``.
        task: Indicator to predict.
        protocol: ``paper``, ``nested`` or ``spatial``, or a :class:`Protocol` object.
        head: A single-task head name (see :mod:`urbanprofile.heads.registry`): ``ridge``, ``knn``,
            ``ridge-blocks`` (an embedding whose ``emb_*`` columns are learned and whose other columns are raw
            counts; the probe weighs the two blocks, chosen by inner CV), ``mlp``, ``prompt4re-<model>``, ...
            Multi-task heads go through :func:`evaluate_tasks`.
        random_state: Seed of the inner folds and of the head.
        candidates: Other label-free embeddings of the same method (e.g. training checkpoints). Under
            ``nested`` and ``spatial`` each outer fold uses the candidate with the lowest inner-CV error
            on its training regions; ``paper`` ignores them and uses ``embedding``.
        train_fraction: Share of each outer training fold the probe is fit on (a label-efficiency point): a
            subset drawn with ``random_state``, nested across shares (:func:`subsample_train`); the probe's
            settings are still chosen by inner CV on the subset only, and the test folds are unchanged.
        keep_heads: Keep each outer fold's fitted head and chosen candidate in ``fold_heads``.

    Raises:
        UrbanProfileError: A train fraction outside (0, 1] or one that leaves too few regions for the inner CV.
    """
    policy = get_protocol(protocol)
    check_train_fraction(train_fraction)
    spec = parse_head(head)
    if spec.multitask:
        raise UrbanProfileError(f"head {head!r} fits all tasks jointly: evaluate it with --task all")
    policy.check_available(city)
    td = task_data(city, task)
    # A fixed-probe protocol evaluates the embedding as it is; the others pick a checkpoint by inner CV.
    options = dict(candidates) if candidates and not policy.fixed_probe else {"final": embedding}
    matrices = {label: _embedding_matrix(city, frame, td.region_ids, label) for label, frame in options.items()}
    n_features = next(iter(matrices.values())).shape[1]
    prompts = _prompt_features(city, spec, task, td.region_ids)
    if prompts is not None:
        matrices = {label: np.hstack([X, prompts]) for label, X in matrices.items()}
    y = td.y
    # The learned block of a learned + raw embedding: its leading emb_* columns.
    n_learned = int(next(iter(options.values())).columns.str.startswith("emb_").sum())
    inner_groups = policy.inner_groups(city, td)

    pred = np.zeros_like(y)
    fold = np.zeros(len(y), dtype=int)
    chosen: list[dict[str, Any]] = []
    n_train: list[int] = []
    fold_heads: list[tuple[str, Any]] = []
    start = time.perf_counter()
    folds = policy.splits(city, td)
    progress = FoldProgress(f"{city.name} {task} {policy.name}", len(folds), len(y))
    for k, (train, test) in enumerate(folds):
        train = subsample_train(train, train_fraction, random_state, k,
                                inner_groups[train] if inner_groups is not None else None,
                                f"{city.name} {task} {policy.name}")
        n_train.append(len(train))
        groups = inner_groups[train] if inner_groups is not None else None
        label, estimator = fit_best_candidate(
            matrices, train, y, groups,
            lambda: build_head(spec, policy.fixed_probe, random_state, n_region_features=n_features,
                               n_learned=n_learned))
        pred[test] = estimator.predict(matrices[label][test])
        fold[test] = k
        chosen.append({**estimator.chosen(), **({"candidate": label} if len(matrices) > 1 else {})})
        if keep_heads:
            fold_heads.append((label, estimator))
        progress.fold_done(k)
    head_seconds = time.perf_counter() - start
    return ProtocolResult(
        task=task,
        protocol=policy.name,
        region_ids=td.region_ids,
        y=y,
        pred=pred,
        fold=fold,
        metrics=regression_metrics(y, pred),
        bias=geographic_bias(city, td, y, pred),
        chosen=chosen,
        head_seconds=head_seconds,
        task_info=td.describe(),
        head=head,
        train_fraction=float(train_fraction),
        n_train=n_train,
        fold_heads=fold_heads,
    )


def _embedding_matrix(city: CityData, frame: pd.DataFrame, region_ids: pd.Index, label: str) -> np.ndarray:
    missing = region_ids.difference(frame.index)
    if len(missing):
        raise DataError(f"embedding {label!r} has no row for region {missing[0]} of {city.name!r}")
    matrix = frame.loc[region_ids].to_numpy(dtype=float)
    if not np.isfinite(matrix).all():
        raise DataError(f"embedding {label!r} has NaN or infinite values for {city.name!r}")
    return matrix


def _prompt_features(city: CityData, spec: HeadSpec, task: str, region_ids: pd.Index) -> np.ndarray | None:
    """The frozen prompt vectors of a prompt head, rows in ``region_ids`` order (label-free, all regions)."""
    if not spec.needs_prompts or spec.prompt_model is None:
        return None

    vectors = prompt_vectors(city, task, spec.prompt_model, use_task_prompt=spec.task_prompt)
    position = pd.Series(np.arange(city.n_regions), index=city.region_ids).loc[region_ids].to_numpy()
    return np.asarray(vectors[position], dtype=float)


def joint_regions(city: CityData, tasks: list[str]) -> tuple[TaskData, dict[str, TaskData]]:
    """The regions labelled for at least one task (as a pseudo task ``all``) and each task's own data."""
    per_task = {t: task_data(city, t) for t in tasks}
    labelled = city.region_ids[city.region_ids.isin(np.unique(np.concatenate(
        [td.region_ids.to_numpy() for td in per_task.values()])))]
    union = TaskData(task="all", region_ids=labelled, y=np.zeros(len(labelled)), n_missing=0, n_zero_dropped=0)
    return union, per_task


def evaluate_tasks(
    city: CityData,
    embedding: pd.DataFrame,
    tasks: list[str] | None = None,
    protocol: str = "nested",
    head: str = "moe",
    random_state: int | None = 0,
    train_fraction: float = 1.0,
) -> list[ProtocolResult]:
    """Cross-validate a head on several tasks over one set of outer folds (all tasks jointly).

    The outer folds split the regions labelled for any of the tasks; a task's test rows in a fold are its
    labelled regions there. A multi-task head (``moe``, ``mlp-multitask``) is fit once per fold on every
    task's training labels (missing labels masked); a single-task head is fit per task on the same folds,
    so heads compared through this function see identical splits. Each task's result uses its own label
    rules (missing labels, the peers' zero rule, its scale).

    ``train_fraction`` keeps a seeded share of each outer training fold, as in :func:`evaluate_embedding`.

    Returns:
        One :class:`ProtocolResult` per task, in ``tasks`` order.
    """
    policy = get_protocol(protocol)
    check_train_fraction(train_fraction)
    spec = parse_head(head)
    policy.check_available(city)
    tasks = list(tasks or city.tasks)
    union, per_task = joint_regions(city, tasks)
    X = _embedding_matrix(city, embedding, union.region_ids, "final")
    block_names, blocks = embedding_blocks(embedding.columns)
    position = pd.Series(np.arange(len(union.region_ids)), index=union.region_ids)
    rows = {t: position.loc[td.region_ids].to_numpy() for t, td in per_task.items()}
    Y = np.full((len(union.region_ids), len(tasks)), np.nan)
    for j, t in enumerate(tasks):
        Y[rows[t], j] = per_task[t].y
    inner_groups = policy.inner_groups(city, union)
    folds = policy.splits(city, union)

    pred = np.full_like(Y, np.nan)
    fold = np.zeros(len(Y), dtype=int)
    chosen: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    seconds = dict.fromkeys(tasks, 0.0)
    n_train: dict[str, list[int]] = {t: [] for t in tasks}
    for k, (train, test) in enumerate(folds):
        fold[test] = k
        train = subsample_train(train, train_fraction, random_state, k,
                                inner_groups[train] if inner_groups is not None else None,
                                f"{city.name} {'+'.join(tasks)} {protocol}")
        for j, t in enumerate(tasks):
            n_train[t].append(int(np.isfinite(Y[train, j]).sum()))
        groups = inner_groups[train] if inner_groups is not None else None
        if spec.multitask:
            start = time.perf_counter()
            model = build_head(spec, policy.fixed_probe, random_state, blocks=blocks, block_names=block_names)
            model.fit(X[train], Y[train], groups=groups)
            pred[test] = model.predict(X[test])
            for t in tasks:
                chosen[t].append(model.chosen())
                seconds[t] += (time.perf_counter() - start) / len(tasks)
            continue
        for j, t in enumerate(tasks):
            start = time.perf_counter()
            labelled = np.isfinite(Y[:, j])
            tr, te = train[labelled[train]], test[labelled[test]]
            Xt = X
            prompts = _prompt_features(city, spec, t, union.region_ids)
            if prompts is not None:
                Xt = np.hstack([X, prompts])
            model = build_head(spec, policy.fixed_probe, random_state, n_region_features=X.shape[1])
            model.fit(Xt[tr], Y[tr, j], groups=groups[labelled[train]] if groups is not None else None)
            if len(te):
                pred[te, j] = model.predict(Xt[te])
            chosen[t].append(model.chosen())
            seconds[t] += time.perf_counter() - start
    results = []
    for j, t in enumerate(tasks):
        td, r = per_task[t], rows[t]
        results.append(ProtocolResult(
            task=t, protocol=protocol, region_ids=td.region_ids, y=td.y, pred=pred[r, j], fold=fold[r],
            metrics=regression_metrics(td.y, pred[r, j]), bias=geographic_bias(city, td, td.y, pred[r, j]),
            chosen=chosen[t], head_seconds=seconds[t], task_info=td.describe() + "; joint folds", head=head,
            train_fraction=float(train_fraction), n_train=n_train[t],
        ))
    return results


def geographic_bias(city: CityData, td: TaskData, y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Per-block R^2 and MAE, the worst block's gap to the whole, and Moran's I of the residuals."""
    nan = float("nan")
    if not city.has_locations:
        return {"block_r2": {}, "block_mae": {}, "worst_block_r2": nan, "r2_gap": nan,
                "worst_block_mae": nan, "morans_i": nan, "weights": "no locations"}
    blocks = _task_blocks(city, td, N_BIAS_BLOCKS)
    per_r2: dict[str, float] = {}
    per_mae: dict[str, float] = {}
    for b in np.unique(blocks):
        inside = blocks == b
        m = regression_metrics(y[inside], pred[inside])
        per_r2[str(int(b))] = m["r2"]
        per_mae[str(int(b))] = m["mae"]
    overall = regression_metrics(y, pred)["r2"]
    finite_r2 = [v for v in per_r2.values() if np.isfinite(v)]
    worst = min(finite_r2) if finite_r2 else nan
    weights, source = adjacency_weights(city)
    position = pd.Series(np.arange(city.n_regions), index=city.region_ids).loc[td.region_ids].to_numpy()
    sub = weights[position][:, position]
    return {
        "block_r2": per_r2,
        "block_mae": per_mae,
        "worst_block_r2": worst,
        "r2_gap": overall - worst,
        "worst_block_mae": max(per_mae.values()),
        "morans_i": morans_i(y - pred, sub.tocsr()),
        "weights": source,
    }
