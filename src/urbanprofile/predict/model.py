"""Fit a method and a head on the labelled regions of a dataset, keep them in a model folder, predict the rest.

``fit_model`` embeds the city (label-free, every region, as the protocols do), fits the head on every labelled
region with settings chosen by inner CV, and calibrates conformal intervals on the out-of-fold residuals of
``evaluate_embedding`` (the same code that scores the method). ``predict_regions`` loads nothing but
what the folder holds, checks the dataset against the fit one and returns one row per region with the
prediction, its interval, the applicability flag and the geometry.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile import __version__
from urbanprofile.data.city import CityData
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import MethodUnavailableError, UrbanProfileError
from urbanprofile.evaluation.protocols import (
    evaluate_embedding,
    fit_best_candidate,
    get_protocol,
    n_spatial_blocks,
    outer_splits,
)
from urbanprofile.evaluation.spatial import spatial_blocks
from urbanprofile.heads.registry import build_head, parse_head
from urbanprofile.methods import MethodSpec, get_method
from urbanprofile.predict.applicability import (
    applicability_table,
    leave_one_out_threshold,
    lonlat_km,
    nearest_distance,
)
from urbanprofile.predict.conformal import (
    INTERVALS,
    EmbeddingSpace,
    calibration_difficulty,
    check_level,
    conformal_intervals,
    cv_plus_intervals,
    difficulty,
    difficulty_floor,
    held_out_fold_coverage,
)
from urbanprofile.predict.folder import CONFIG, FolderReader, FolderWriter, ModelFolderError, check_new_folder

#: Protocols whose folds can choose settings and calibrate intervals (``paper`` fixes its settings).
FIT_PROTOCOLS = ("nested", "spatial")
#: Heads a model folder can hold (skops-saved probes).
SAVABLE_HEADS = ("ridge", "knn", "ridge-blocks")
#: Embedder modules whose fitted state is saved (skops) and re-applied to the views of the dataset predicted on.
_STATEFUL_BASELINES = ("urbanprofile.embedders.baselines.raw", "urbanprofile.embedders.baselines.pca")


def _method_kind(spec: MethodSpec) -> str:
    """``row`` (a region's embedding reads its own row only: transfers to new regions), ``city`` (a baseline
    whose features depend on the whole region set: OD profiles, coordinates about the city's centre) or
    ``learned`` (a transductive embedder: only the regions it was trained on)."""
    module = spec.factory.partition(":")[0]
    if module not in _STATEFUL_BASELINES:
        return "learned"
    views = tuple(spec.params.get("views", ()))
    if spec.factory.endswith(":RawViews") and views and "od_flows" not in views:
        return "row"
    return "city"


def dataset_fingerprint(city: CityData) -> dict[str, Any]:
    """Region ids, view names and shapes, and a content hash of the views and locations (labels excluded, so a
    rebuilt city with new labels keeps its fingerprint)."""
    digest = hashlib.sha256()
    ids = [str(r) for r in city.region_ids]
    digest.update("\n".join(ids).encode())
    for name in sorted(city.views):
        frame = city.views[name]
        digest.update(name.encode())
        digest.update("\n".join(map(str, frame.columns)).encode())
        digest.update(np.ascontiguousarray(frame.to_numpy(dtype=float)).tobytes())
    if city.has_locations:
        digest.update(np.ascontiguousarray(city.coordinates()).tobytes())
    return {
        "dataset": city.name,
        "n_regions": city.n_regions,
        "region_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "views": {name: list(frame.shape) for name, frame in sorted(city.views.items())},
        "content_sha256": digest.hexdigest(),
    }


@dataclass
class FittedModel:
    """A model as read from (or just written to) its folder."""

    folder: Path
    config: dict[str, Any]
    head: Any
    arrays: dict[str, np.ndarray]
    training: pd.DataFrame
    embedder: Any = None
    embedding: pd.DataFrame | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: ``--interval cv+``: each calibration fold's head, and the embeddings of the checkpoints they chose
    #: (learned methods; by candidate label) where not the one ``embedding`` holds.
    fold_heads: list[Any] = field(default_factory=list)
    fold_embeddings: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def task(self) -> str:
        return str(self.config["task"])


def _check_protocol(option: str, protocol: str) -> None:
    if protocol not in FIT_PROTOCOLS:
        choices = ", ".join((*FIT_PROTOCOLS, "auto") if option == "--calibration" else FIT_PROTOCOLS)
        raise UrbanProfileError(f"{option} must be one of {choices}, got {protocol!r}")


def _settings_groups(city: CityData, region_ids: pd.Index, protocol: str) -> np.ndarray | None:
    """Inner-CV groups of the head's settings: the spatial protocol's blocks (as ``evaluate_embedding`` makes
    them, over the whole city), or none for random inner folds."""
    if not get_protocol(protocol).spatial_folds:
        return None
    blocks = pd.Series(spatial_blocks(city, n_spatial_blocks(city.n_regions)), index=city.region_ids)
    return blocks.loc[region_ids].to_numpy()


#: A region's distance to the labelled set is measured to its k-th nearest labelled region: the nearest alone says
#: a region on the edge of a missing district is as well placed as one among labelled neighbours.
GAP_NEIGHBOURS = 5


def _kth_distance(reference: np.ndarray, query: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    k = min(GAP_NEIGHBOURS, len(reference))
    distance, _ = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query)
    return np.asarray(distance[:, -1], dtype=float)


def _fold_distances(km: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each labelled region's distance to the labelled regions of its fold's training set."""
    distance = np.zeros(len(km))
    for train, test in folds:
        distance[test] = _kth_distance(km[train], km[test])
    return distance


def choose_calibration(city: CityData, task: str) -> tuple[str, dict[str, Any]]:
    """``--calibration auto``: the folds whose held-out regions lie as far from their training regions as the
    regions to predict (those without the label) lie from the labelled ones.

    Conformal intervals hold when calibration errors are made at the distances the predictions will be made at:
    random folds calibrate on regions whose neighbours were in training (right for scattered gaps, far too
    narrow for a missing district), whole blocks calibrate on regions far from training (right for a missing
    district, too wide for scattered gaps). The choice reads only locations and which regions are labelled, never
    a label of a region to predict. Distances are compared as distributions (1-Wasserstein) in units of the
    labelled regions' median spacing; a tie, or a city with every region labelled, keeps ``spatial``, the
    cautious choice.

    Returns:
        The protocol chosen and the facts behind the choice (for ``model.json``).
    """
    from scipy.stats import wasserstein_distance

    if not city.has_locations:
        return "nested", {"asked": "auto", "why": "no region locations: random folds"}
    td = task_data(city, task)
    labels = city.targets[task] if task in city.targets.columns else pd.Series(np.nan, index=city.region_ids)
    gaps = city.region_ids[labels.isna().to_numpy()]
    coords = pd.DataFrame(city.coordinates(), index=city.region_ids)
    origin = city.coordinates().mean(axis=0)
    labelled_km = lonlat_km(coords.loc[td.region_ids].to_numpy(), origin)
    if not len(gaps):
        return "spatial", {"asked": "auto", "why": "every region is labelled: no gaps to match; spatial blocks"}
    spacing = float(np.median(leave_one_out_spacing(labelled_km))) or 1.0
    gap_distance = _kth_distance(labelled_km, lonlat_km(coords.loc[gaps].to_numpy(), origin)) / spacing
    mismatch: dict[str, float] = {}
    for protocol in ("spatial", "nested"):
        folds = outer_splits(city, td, protocol)
        if len(folds) >= 2:
            mismatch[protocol] = float(wasserstein_distance(_fold_distances(labelled_km, folds) / spacing,
                                                            gap_distance))
    chosen = min(mismatch, key=lambda p: (mismatch[p], p != "spatial"))
    return chosen, {"asked": "auto", "gap_distance_median": float(np.median(gap_distance)),
                    "mismatch": mismatch, "unit": "median spacing of the labelled regions",
                    "why": f"{chosen} folds hold out regions at distances most like the {len(gaps)} unlabelled ones"}


#: ``fit --widths``: how interval widths vary between regions.
WIDTHS = ("auto", "difficulty", "constant")
#: The level ``--widths auto`` compares the two at (``predict``'s default).
WIDTHS_LEVEL = 0.9


def choose_scale(
    widths: str, y: np.ndarray, oof_pred: np.ndarray, cal_sigmas: np.ndarray, folds: np.ndarray, y_min: float,
) -> tuple[str, dict[str, Any]]:
    """``--widths auto``: difficulty-scaled widths where they hold on the labelled regions, else one width.

    Each calibration fold in turn is scored with intervals calibrated on the other folds only (as the prediction
    page measures coverage), once with difficulty-scaled and once with constant widths; the construction whose
    coverage at :data:`WIDTHS_LEVEL` lies nearer to it is kept (a tie keeps the difficulty). Scaling by the
    difficulty of a region's neighbours in embedding space narrows the intervals where neighbours were easy,
    which under-covers where errors come from distance to the labelled regions rather than from the embedding
    (CityView's tiles in a missing block). Reads only the labelled regions' out-of-fold residuals.

    Returns:
        ``difficulty`` or ``constant``, and the measured coverages (for ``model.json``).
    """
    if widths != "auto":
        return widths, {"asked": widths}
    measured = {}
    for name, sigmas in (("difficulty", cal_sigmas), ("constant", np.ones_like(cal_sigmas))):
        try:
            measured[name] = float(held_out_fold_coverage(y, oof_pred, sigmas, folds, WIDTHS_LEVEL,
                                                          y_min=y_min)["coverage"])  # type: ignore[arg-type]
        except UrbanProfileError:  # too few regions in the other folds for a finite interval
            return "difficulty", {"asked": "auto", "why": "too few calibration regions to compare"}
    chosen = min(measured, key=lambda k: (abs(measured[k] - WIDTHS_LEVEL), k != "difficulty"))
    other = "constant" if chosen == "difficulty" else "difficulty"
    return chosen, {"asked": "auto", "held_out_coverage": measured, "level": WIDTHS_LEVEL,
                    "why": f"{chosen} widths covered {measured[chosen]:.3f} of the held-out calibration folds at "
                           f"{WIDTHS_LEVEL:.0%} ({other}: {measured[other]:.3f})"}


def leave_one_out_spacing(km: np.ndarray) -> np.ndarray:
    """Each labelled region's distance to its nearest other labelled region."""
    from sklearn.neighbors import NearestNeighbors

    distance, _ = NearestNeighbors(n_neighbors=2).fit(km).kneighbors(km)
    return np.asarray(distance[:, 1], dtype=float)


def fit_model(
    city: CityData, method: str, task: str, out: str | Path, head: str | None = None,
    protocol_for_settings: str = "nested", calibration: str = "auto", random_state: int = 0,
    embedding: pd.DataFrame | None = None, source: str | None = None,
    candidates: dict[str, pd.DataFrame] | None = None, interval: str = "normalised", widths: str = "auto",
) -> FittedModel:
    """Fit ``method`` + ``head`` on every region of ``city`` labelled for ``task`` and write the model folder.

    Args:
        city: The dataset; its regions without the label are the ones to predict later.
        method: A registered method.
        task: The indicator.
        out: The model folder to create (its parent must exist; it must not exist or be empty).
        head: ``ridge``, ``knn`` or ``ridge-blocks`` (default: the method's own head).
        protocol_for_settings: ``nested`` (random inner folds) or ``spatial`` (inner folds over blocks).
        calibration: Folds of the out-of-fold residuals the intervals are calibrated on: ``spatial``, ``nested``
            or ``auto`` (the one matching how the unlabelled regions lie: :func:`choose_calibration`).
        random_state: Seed of the embedder, the inner folds and the head.
        embedding: The method's embedding of ``city`` when already computed (benchmarks reuse one per seed).
        source: How the dataset was named (a dataset name or a built folder's path): ``predict``'s default.
        candidates: With ``embedding``: the embedder's training checkpoints (``candidates_``) to choose from.
        interval: ``normalised`` (the full model's prediction +- a quantile of the difficulty-scaled out-of-fold
            residuals) or ``cv+`` (the calibration folds' own models at the new region, CV+; the folder then
            keeps one head per calibration fold).
        widths: ``difficulty`` (each region's width scaled by its difficulty), ``constant`` (one width) or
            ``auto`` (:func:`choose_scale`: difficulty where it holds on the calibration folds).

    A learned method's embedding is not simply its final epoch: the checkpoint kept is the one whose head has the
    lowest inner-CV error on the labelled regions (``protocol_for_settings``'s inner folds), as the ``nested`` and
    ``spatial`` protocols choose it on each outer training fold; the calibration folds choose again on their own
    training regions, so the intervals account for that choice too.

    Raises:
        UrbanProfileError: A bad option, too few labelled regions, a method unavailable on the city, an
            output folder that exists or whose parent does not.
    """
    out = Path(out)
    spec = get_method(method)
    head_name = head or spec.head
    head_spec = parse_head(head_name)
    if head_name not in SAVABLE_HEADS:
        raise UrbanProfileError(f"head {head_name!r} cannot be kept in a model folder yet; use one of "
                                f"{', '.join(SAVABLE_HEADS)}")
    _check_protocol("--protocol-for-settings", protocol_for_settings)
    if widths not in WIDTHS:
        raise UrbanProfileError(f"--widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
    if interval not in INTERVALS:
        raise UrbanProfileError(f"--interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    calibration_choice: dict[str, Any] = {"asked": calibration}
    if calibration == "auto":
        calibration, calibration_choice = choose_calibration(city, task)
    _check_protocol("--calibration", calibration)
    if "spatial" in (protocol_for_settings, calibration) and not city.has_locations:
        raise MethodUnavailableError(f"spatial folds need region locations, which {city.name!r} lacks; use "
                                     "--protocol-for-settings nested --calibration nested")
    spec.check_available(city)
    td = task_data(city, task)
    n_folds = len(outer_splits(city, td, calibration))
    if n_folds < 2:
        raise UrbanProfileError(f"{city.name}: the {len(td.y)} regions labelled for {task!r} fall in {n_folds} "
                                f"{calibration} fold; calibration needs labelled regions in at least 2 folds "
                                "(label regions in more places, or use --calibration nested)")
    check_new_folder(out)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    embedder = spec.build(random_state=random_state)
    emb = embedding if embedding is not None else embedder.fit_transform(city)
    if embedding is not None and _method_kind(spec) != "learned":
        embedder.fit(city)  # baselines are cheap and their fitted state is what the folder keeps
    if embedding is None:
        candidates = getattr(embedder, "candidates_", None)
    timings["embed"] = time.perf_counter() - start

    start = time.perf_counter()
    n_learned = int(emb.columns.str.startswith("emb_").sum())
    options = dict(candidates) if candidates else {"final": emb}
    matrices = {label: frame.loc[td.region_ids].to_numpy(dtype=float) for label, frame in options.items()}
    n_features = next(iter(matrices.values())).shape[1]
    chosen, estimator = fit_best_candidate(
        matrices, np.arange(len(td.y)), td.y, _settings_groups(city, td.region_ids, protocol_for_settings),
        lambda: build_head(head_spec, get_protocol(protocol_for_settings).fixed_probe, random_state,
                           n_region_features=n_features, n_learned=n_learned))
    emb = options[chosen]
    X = matrices[chosen]
    # The calibration residuals: out-of-fold predictions of the very code that scores the method.
    oof = evaluate_embedding(city, emb, task, protocol=calibration, head=head_name, random_state=random_state,
                             candidates=candidates, keep_heads=interval == "cv+")
    timings["head"] = time.perf_counter() - start

    space = EmbeddingSpace.fit(X)
    Z = space.transform(X)
    abs_residuals = np.abs(oof.y - oof.pred)
    floor = difficulty_floor(abs_residuals)
    cal_sigmas = calibration_difficulty(Z, abs_residuals, floor)
    scale, scale_choice = choose_scale(widths, oof.y, oof.pred, cal_sigmas, oof.fold,
                                       0.0 if (td.y >= 0).all() else -np.inf)
    if scale == "constant":
        cal_sigmas = np.ones_like(cal_sigmas)
    arrays: dict[str, np.ndarray] = {
        "Z_labelled": Z, "abs_residuals": abs_residuals, "cal_residuals": oof.y - oof.pred,
        "cal_sigmas": cal_sigmas, "space_mean": space.mean, "space_scale": space.scale,
    }
    thresholds: dict[str, Any] = {"embedding": leave_one_out_threshold(Z), "spatial_km": None}
    origin = None
    if city.has_locations:
        origin = city.coordinates().mean(axis=0)
        labelled_km = lonlat_km(pd.DataFrame(city.coordinates(), index=city.region_ids).loc[td.region_ids]
                                .to_numpy(), origin)
        arrays["labelled_km"] = labelled_km
        thresholds["spatial_km"] = leave_one_out_threshold(labelled_km)
    # CV+ with a learned method: a fold's head reads the checkpoint it chose, which may not be the one kept.
    fold_embeddings = {label: options[label].set_axis(options[label].index.astype(str))
                       for label in dict.fromkeys(label for label, _ in oof.fold_heads) if label != chosen}
    training = pd.DataFrame({"y": oof.y, "oof_pred": oof.pred, "fold": oof.fold}, index=td.region_ids)
    training.index.name = "region_id"
    fit_regions = pd.DataFrame({"fit_region": True}, index=city.region_ids.astype(str))

    config: dict[str, Any] = {
        "urbanprofile_version": __version__,
        "method": spec.name, "method_factory": spec.factory, "method_params": spec.params,
        "method_kind": _method_kind(spec), "head": head_name, "head_settings": estimator.chosen(),
        "task": task, "task_scale": td.scale, "labels_non_negative": bool((td.y >= 0).all()),
        "random_state": random_state, "protocol_for_settings": protocol_for_settings, "calibration": calibration,
        "calibration_choice": calibration_choice, "interval": interval, "widths": scale,
        "widths_choice": scale_choice,
        "fold_candidates": [label for label, _ in oof.fold_heads],
        "fold_embedding_files": {label: f"fold-embedding-{i}.parquet" for i, label in enumerate(fold_embeddings)},
        "oof_metrics": oof.metrics, "n_labelled": len(td.y), "n_calibration": len(td.y),
        "fingerprint": dataset_fingerprint(city), "dataset_source": source or city.name,
        "difficulty_floor": floor, "thresholds": thresholds,
        "space_log": space.log,
        "origin_lonlat": None if origin is None else [float(v) for v in origin],
        "view_columns": {v: [str(c) for c in city.views[v].columns] for v in spec.requires_views},
        "embedding_columns": [str(c) for c in emb.columns],
        "checkpoint": None if len(options) < 2 else {
            "chosen": chosen, "candidates": list(options),
            "by": f"lowest inner-CV error of the head ({protocol_for_settings} inner folds, labelled regions only)",
            "embedder_weights": "the network after the last epoch; predict reads the chosen checkpoint's embedding "
                                "(embedding.parquet)"},
    }
    writer = FolderWriter(out)
    try:
        writer.json(CONFIG, config)
        writer.skops("head.skops", estimator)
        writer.arrays("calibration.safetensors", arrays)
        writer.parquet("training.parquet", training)
        writer.parquet("fit_regions.parquet", fit_regions)
        for k, (_, fold_head) in enumerate(oof.fold_heads):
            writer.skops(f"fold-head-{k}.skops", fold_head)
        for label, file in config["fold_embedding_files"].items():
            writer.parquet(file, fold_embeddings[label])
        if config["method_kind"] == "learned":
            # Transductive: the embedding of the fit regions is what predict reads; the trained network is kept
            # beside it (safetensors) so the folder holds the whole fitted model.
            writer.parquet("embedding.parquet", emb.set_axis(emb.index.astype(str)))
            if hasattr(embedder, "network_") and hasattr(embedder.network_, "state_dict"):
                writer.torch_weights("embedder_weights.safetensors", embedder.network_)
        else:
            writer.skops("embedder.skops", embedder)
        folder = writer.commit({"urbanprofile_version": __version__, "method": spec.name, "task": task})
    except BaseException:
        writer.abort()
        raise
    learned = config["method_kind"] == "learned"
    # Region ids as the folder keeps them (strings), so a just-fit model predicts like a loaded one.
    return FittedModel(folder, config, estimator, arrays, training, None if learned else embedder,
                       emb.set_axis(emb.index.astype(str)) if learned else None, timings,
                       fold_heads=[fold_head for _, fold_head in oof.fold_heads], fold_embeddings=fold_embeddings)


def load_model(folder: str | Path) -> FittedModel:
    """Read a model folder, checked whole first (manifest, hashes, format version); one-line errors otherwise."""
    reader = FolderReader(Path(folder))
    config = reader.config
    for key in ("method", "task", "method_kind", "head", "fingerprint", "thresholds", "space_log", "n_calibration"):
        if key not in config:
            raise ModelFolderError(f"{reader.folder / CONFIG}: no {key!r} entry")
    kind = config["method_kind"]
    n_fold_heads = len(config.get("fold_candidates", []))
    if config.get("interval", "normalised") == "cv+" and not n_fold_heads:
        raise ModelFolderError(f"{reader.folder / CONFIG}: a cv+ model with no calibration-fold heads")
    return FittedModel(
        folder=reader.folder, config=config, head=reader.skops("head.skops"),
        arrays=reader.arrays("calibration.safetensors"), training=reader.parquet("training.parquet"),
        embedder=reader.skops("embedder.skops") if kind != "learned" else None,
        embedding=reader.parquet("embedding.parquet") if kind == "learned" else None,
        fold_heads=[reader.skops(f"fold-head-{k}.skops") for k in range(n_fold_heads)],
        fold_embeddings={label: reader.parquet(file)
                         for label, file in config.get("fold_embedding_files", {}).items()},
    )


def _fit_region_ids(model: FittedModel) -> pd.Index:
    return pd.read_parquet(model.folder / "fit_regions.parquet").index


def _embed(model: FittedModel, city: CityData) -> pd.DataFrame:
    """The embedding of every region of ``city`` as the model's features, or a one-line error saying why not."""
    spec = get_method(model.method) if model.config["method_kind"] != "learned" else None
    fit_name = model.config["fingerprint"]["dataset"]
    for view in (spec.requires_views if spec else ()):
        if view not in city.views:
            raise MethodUnavailableError(f"dataset {city.name!r} has no {view!r} view, which model {model.folder} "
                                         f"({model.method}) needs")
    fit_ids = _fit_region_ids(model)
    ids = city.region_ids.astype(str)
    unseen = ids.difference(fit_ids)
    kind = model.config["method_kind"]
    if kind != "row" and len(unseen):
        why = ("it learns an embedding of the regions it was trained on only" if kind == "learned" else
               "its features depend on the whole set of regions it was fit on")
        raise MethodUnavailableError(f"region {unseen[0]!r} of {city.name!r} was not in {fit_name!r}, and "
                                     f"{model.method} cannot embed new regions ({why}); fit a model on "
                                     f"{city.name!r} instead")
    if kind == "learned":
        assert model.embedding is not None
        frame = model.embedding.loc[ids]
        return frame.set_axis(city.region_ids)
    if kind == "row":
        for view, columns in model.config["view_columns"].items():
            have = [str(c) for c in city.views[view].columns]
            if have != columns:
                extra = sorted(set(have) ^ set(columns))
                detail = f"column {extra[0]!r} differs" if extra else "its columns are in another order"
                raise MethodUnavailableError(f"view {view!r} of {city.name!r} does not match the one model "
                                             f"{model.folder} was fit on ({detail})")
        return model.embedder.transform(city)
    if len(fit_ids.difference(ids)):
        missing = fit_ids.difference(ids)[0]
        raise MethodUnavailableError(f"region {missing!r} of {fit_name!r} is missing from {city.name!r}, and "
                                     f"{model.method}'s features depend on the whole set of regions it was fit on")
    # The fitted features (OD profiles, coordinates about the centre) follow the fit city's region order.
    order = pd.Series(city.region_ids, index=ids).loc[fit_ids]
    frame = model.embedder.transform(city.subset(pd.Index(order.to_numpy())))
    return frame.loc[city.region_ids]


def _fold_matrix(model: FittedModel, label: str, emb: pd.DataFrame, targets: pd.Index) -> np.ndarray:
    """The features a calibration fold's head reads: the kept embedding, or the checkpoint that fold chose."""
    if label not in model.fold_embeddings:
        return emb.loc[targets].to_numpy(dtype=float)
    frame = model.fold_embeddings[label]
    return frame.loc[targets.astype(str)].to_numpy(dtype=float)


def predict_regions(
    model: FittedModel, city: CityData, level: float = 0.9, all_regions: bool = False,
) -> pd.DataFrame:
    """Predict ``model.task`` for the regions of ``city`` without the label (``all_regions``: every region).

    Returns:
        A GeoDataFrame indexed by ``region_id``: ``prediction``, ``lower``, ``upper``, ``interval_width``,
        ``level``, ``applicable``, ``applicability_reason``, ``embedding_distance``, ``spatial_distance_km``,
        ``label`` (the known label, NaN where missing), ``label_scale`` and ``geometry``.
    """
    check_level(level, int(model.config["n_calibration"]))
    task = model.task
    emb = _embed(model, city)  # first: a dataset the model cannot read is the more useful error
    labels = city.targets[task] if task in city.targets.columns else pd.Series(np.nan, index=city.region_ids)
    targets = city.region_ids if all_regions else city.region_ids[labels.isna().to_numpy()]
    if not len(targets):
        raise UrbanProfileError(f"every region of {city.name!r} has a {task!r} label: nothing to predict (use --all "
                                "to predict them anyway)")
    expected = model.config["embedding_columns"]
    if [str(c) for c in emb.columns] != expected:
        raise MethodUnavailableError(f"{model.method} embeds {city.name!r} into {emb.shape[1]} features; model "
                                     f"{model.folder} was fit on {len(expected)}")
    X = emb.loc[targets].to_numpy(dtype=float)
    if not np.isfinite(X).all():
        raise UrbanProfileError(f"the {model.method} embedding of {city.name!r} has NaN or infinite values")
    pred = np.asarray(model.head.predict(X), dtype=float)
    a = model.arrays
    space = EmbeddingSpace(bool(model.config["space_log"]), a["space_mean"], a["space_scale"])
    Z = space.transform(X)
    if model.config.get("widths", "difficulty") == "constant":
        sigmas = np.ones(len(Z))
    else:
        sigmas = difficulty(a["Z_labelled"], a["abs_residuals"], Z, float(model.config["difficulty_floor"]))
    y_min = 0.0 if model.config["labels_non_negative"] else -np.inf
    if model.config.get("interval", "normalised") == "cv+":
        fold_preds = np.vstack([
            np.asarray(fold_head.predict(_fold_matrix(model, label, emb, targets)), dtype=float)
            for fold_head, label in zip(model.fold_heads, model.config["fold_candidates"], strict=True)])
        scores = np.abs(a["cal_residuals"]) / a["cal_sigmas"]
        lower, upper = cv_plus_intervals(fold_preds, model.training["fold"].to_numpy(dtype=int), scores, sigmas,
                                         level, y_min=y_min)
    else:
        lower, upper = conformal_intervals(pred, sigmas, a["cal_residuals"], a["cal_sigmas"], level, y_min=y_min)
    thresholds = model.config["thresholds"]
    spatial = None
    if "labelled_km" in a and city.has_locations:
        origin = np.asarray(model.config["origin_lonlat"], dtype=float)
        lonlat = pd.DataFrame(city.coordinates(), index=city.region_ids).loc[targets].to_numpy()
        spatial = nearest_distance(a["labelled_km"], lonlat_km(lonlat, origin))
    flags = applicability_table(nearest_distance(a["Z_labelled"], Z), float(thresholds["embedding"]), spatial,
                                thresholds.get("spatial_km"), targets)
    frame = pd.DataFrame({
        "prediction": pred, "lower": lower, "upper": upper, "interval_width": upper - lower, "level": level,
    }, index=targets).join(flags)
    label_values = labels.loc[targets].to_numpy(dtype=float)
    frame["label"] = np.log1p(label_values) if model.config["task_scale"] == "log1p" else label_values
    frame["label_scale"] = model.config["task_scale"]
    frame.index.name = "region_id"
    import geopandas as gpd

    return gpd.GeoDataFrame(frame, geometry=city.regions.geometry.loc[targets].to_numpy(), crs=city.regions.crs)

