"""What the multi-view embedders read and log: their inputs from a city (views, similarity targets, the
mobility SVD), the named forms of the multi-task objective, and the training log. Shared by the full-batch loop
(:mod:`.training`) and the mini-batch one (:mod:`.minibatch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from urbanprofile.data.city import CityData, view_csr
from urbanprofile.data.features import LogScaler

#: Similarity views the objectives reconstruct, by the count view they describe.
SIMILARITY_VIEWS = {"poi": ("poi_counts", "poi_similarity"), "landuse": ("landuse_counts", "landuse_similarity")}


#: The count views the multi-view embedders read when a city has them all (``od_flows`` is always needed).
MULTI_VIEWS = ("poi_counts", "landuse_counts", "od_flows")


#: Destinations kept per origin, and negatives drawn per epoch (shared by all origins), in the sampled
#: mobility objective.
TOP_DESTINATIONS = 32


NEGATIVES = 256


#: Pairs drawn per region per epoch in the sampled similarity objective.
SIMILARITY_PAIRS = 16


#: Named forms of the multi-task objective. ``weighting``: ``volume`` (sum over pairs of the mobility
#: target divided by its mean, the authors' code) or ``row`` (per-row distributions, mean over rows);
#: ``target``: ``od_target`` (falls back to ``od_flows`` when a city lacks it) or ``od_flows``;
#: ``epsilon``: added to the softmax inside the log (0 = exact log-softmax); ``similarity``: ``cosine``
#: or ``dot`` (what e_i, e_j reconstruct the similarity views with); ``clip``: gradient norm clipping
#: (``None``: none, as the authors); ``similarity_weight``: factor on each similarity view's loss (1: the
#: plain sum of the parts, as the authors; 0: mobility only).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "authors": {"weighting": "volume", "target": "od_target", "epsilon": 1e-4, "similarity": "cosine",
                "clip": None, "similarity_weight": 1.0},
    "distribution": {"weighting": "row", "target": "od_flows", "epsilon": 0.0, "similarity": "dot", "clip": 5.0,
                     "similarity_weight": 1.0},
}


def objective_settings(objective: str | dict[str, Any]) -> dict[str, Any]:
    """The settings of a named objective, or of ``authors`` overridden by a dict of settings.

    Raises:
        ValueError: On an unknown name, setting or value.
    """
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        return dict(OBJECTIVES[objective])
    settings = dict(OBJECTIVES[str(objective.get("base", "authors"))])
    unknown = set(objective) - set(settings) - {"base"}
    if unknown:
        raise ValueError(f"unknown objective setting {sorted(unknown)[0]!r}; valid: {', '.join(settings)}")
    settings.update({k: v for k, v in objective.items() if k != "base"})
    checks = {"weighting": ("volume", "row"), "target": ("od_target", "od_flows"), "similarity": ("cosine", "dot")}
    for key, valid in checks.items():
        if settings[key] not in valid:
            raise ValueError(f"objective {key} must be one of {', '.join(valid)}, got {settings[key]!r}")
    if not 0 <= float(settings["epsilon"]) < 1:
        raise ValueError(f"objective epsilon must be in [0, 1), got {settings['epsilon']}")
    if not float(settings["similarity_weight"]) >= 0:
        raise ValueError(f"objective similarity_weight must be >= 0, got {settings['similarity_weight']}")
    return settings


@dataclass
class MultiViewInputs:
    """Label-free arrays the multi-view embedders train on.

    Attributes:
        features: View name (``poi``, ``landuse``, ``mobility``) -> (N, F) standardised features.
        od: Trip counts (N, N): dense array, or CSR for large cities.
        od_target: The mobility objective's target matrix (the ``od_target`` view), or ``None`` when the
            city has none (then ``od`` is the target).
        similarity: View -> dense (N, N) similarity targets (empty in sparse mode).
        counts: View -> (N, F) raw counts, for cosine targets in sparse mode.
        sparse: Whether the sampled objectives are used.
    """

    features: dict[str, np.ndarray]
    od: np.ndarray | sparse.csr_matrix
    similarity: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    od_target: np.ndarray | sparse.csr_matrix | None = None
    sparse: bool = False

    @property
    def n_regions(self) -> int:
        return int(self.od.shape[0])

    @property
    def similarity_views(self) -> tuple[str, ...]:
        """The similarity views these inputs have (``poi``, ``landuse``: those whose count view was read)."""
        return tuple(v for v in SIMILARITY_VIEWS if v in self.features)

    @classmethod
    def from_city(cls, city: CityData, sparse_mode: bool = False, mobility_dims: int = 64,
                  views: tuple[str, ...] = MULTI_VIEWS) -> MultiViewInputs:
        """POI, land-use and mobility features of a city (log1p + standardised).

        Mobility features are the out- and in-flow profiles (OD rows and columns); in sparse mode they are
        reduced to ``mobility_dims`` components each by a truncated SVD of log1p(OD).

        Args:
            city: The city.
            sparse_mode: Whether to build the sampled objectives' inputs.
            mobility_dims: SVD components of the mobility features in sparse mode.
            views: Count views to read: ``od_flows`` (always needed: the mobility objective) and any of
                ``poi_counts``, ``landuse_counts`` (a city may lack them; their features and similarity
                targets are then left out).
        """
        if "od_flows" not in views:
            raise ValueError(f"the multi-view inputs need the 'od_flows' view, got views {views}")
        unknown = [v for v in views if v not in MULTI_VIEWS]
        if unknown:
            raise ValueError(f"unknown view {unknown[0]!r} for the multi-view inputs; valid: {', '.join(MULTI_VIEWS)}")
        counts = {v: city.view(c).to_numpy(dtype=float) for v, (c, _) in SIMILARITY_VIEWS.items() if c in views}
        scaled = {v: LogScaler().fit(raw).transform(raw) for v, raw in counts.items()}
        has_target = "od_target" in city.views
        if sparse_mode:
            od_sparse = view_csr(city.view("od_flows"))
            scaled["mobility"] = mobility_svd(od_sparse, mobility_dims)
            target = view_csr(city.view("od_target")) if has_target else None
            return cls(scaled, od_sparse, {}, counts, target, sparse=True)
        od = city.view("od_flows").to_numpy(dtype=float)
        profiles = np.hstack([od, od.T])
        scaled["mobility"] = LogScaler().fit(profiles).transform(profiles)
        similarity = {}
        for view, (_, sim_view) in SIMILARITY_VIEWS.items():
            if view not in counts:
                continue
            if sim_view in city.views:
                similarity[view] = city.view(sim_view).to_numpy(dtype=float)
            else:
                similarity[view] = cosine_similarity(counts[view])
        target = city.view("od_target").to_numpy(dtype=float) if has_target else None
        return cls(scaled, od, similarity, counts, target)


def cosine_similarity(counts: np.ndarray) -> np.ndarray:
    unit = counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def mobility_svd(od: sparse.csr_matrix, dims: int) -> np.ndarray:
    """Out- and in-flow structure of a large OD matrix: truncated SVD of log1p(OD), standardised."""
    from sklearn.utils.extmath import randomized_svd

    logged = od.astype(float).log1p()
    dims = max(1, min(dims, min(od.shape) - 1))
    u, s, vt = randomized_svd(logged, n_components=dims, random_state=0)
    features = np.hstack([u * s, vt.T * s])
    std = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)


def top_k_rows(matrix: sparse.csr_matrix, k: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest entries as (indices, weights); empty rows get zero weights.

    Weights are the row's probabilities, or with ``scale`` the entries divided by ``scale`` (volumes).
    """
    n = matrix.shape[0]
    idx = np.zeros((n, k), dtype=np.int64)
    weight = np.zeros((n, k))
    for i in range(n):
        start, end = matrix.indptr[i], matrix.indptr[i + 1]
        cols, vals = matrix.indices[start:end], matrix.data[start:end]
        if len(cols) > k:
            keep = np.argpartition(-vals, k - 1)[:k]
            cols, vals = cols[keep], vals[keep]
        idx[i, : len(cols)] = cols
        total = vals.sum() if scale is None else scale
        if total > 0:
            weight[i, : len(cols)] = vals / total
    return idx, weight


@dataclass
class TrainingLog:
    """What a training run did: per-part losses, timings and optional embedding snapshots.

    ``epoch_seconds`` (mini-batch runs) holds each epoch's training time, without embedding its checkpoints, and
    ``steps_per_epoch`` how many batches an epoch has.
    """

    losses: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    steps_per_epoch: int = 1
    seconds: float = 0.0
    epochs: int = 0
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(self.epochs, 1)
