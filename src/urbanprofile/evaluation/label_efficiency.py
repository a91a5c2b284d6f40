"""Label efficiency: R² of a probe against the number of labelled training regions, on the protocol's own folds.

Each outer training fold is cut to a fraction of its regions (nested subsets: the 10% are among the 25%, and so
on, drawn with the seed); the probe's settings are still chosen by inner CV on the regions kept, and every test
fold is predicted whole, so the figures at 100% are the protocol's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import DataError, MethodUnavailableError
from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.evaluation.protocols import _embedding_matrix, get_protocol
from urbanprofile.heads.registry import build_head, parse_head

#: Shares of each outer training fold a probe is fit on.
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
#: Fewest training regions a probe is fit on (inner CV needs a few per fold).
MIN_TRAIN = 10


def label_efficiency(
    city: CityData,
    embedding: pd.DataFrame,
    task: str,
    protocol: str = "nested",
    head: str = "ridge",
    fractions: Sequence[float] = FRACTIONS,
    random_state: int = 0,
) -> pd.DataFrame:
    """Pooled out-of-fold metrics of a probe fit on a fraction of each outer training fold.

    Args:
        city: The city.
        embedding: One row per region, indexed by ``region_id``.
        task: Indicator to predict.
        protocol: ``nested`` or ``spatial`` (``paper`` fixes its probe, so fewer labels say nothing new about it).
        head: A single-task head without prompts (``ridge``, ``knn``, ``ridge-blocks``, ``mlp``).
        fractions: Shares in (0, 1] of each outer training fold.
        random_state: Seed of the subsets, the inner folds and the head.

    Returns:
        One row per fraction: ``fraction``, ``n_train`` (mean regions per fold), ``r2``, ``mae``, ``rmse``.

    Raises:
        MethodUnavailableError: A multi-task or prompt head, or the ``paper`` protocol.
        DataError: A fraction outside (0, 1].
    """
    policy = get_protocol(protocol)
    if policy.fixed_probe:
        raise MethodUnavailableError(f"label efficiency uses a protocol that tunes its probe ({protocol} fixes it)")
    spec = parse_head(head)
    if spec.multitask or spec.needs_prompts:
        raise MethodUnavailableError(f"label efficiency takes a single-task head without prompts, not {head!r}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise DataError(f"label fractions must be in (0, 1], got {bad[0]}")
    policy.check_available(city)
    td = task_data(city, task)
    X = _embedding_matrix(city, embedding, td.region_ids, "final")
    y = td.y
    n_learned = int(embedding.columns.str.startswith("emb_").sum())
    groups = policy.inner_groups(city, td)
    folds = policy.splits(city, td)
    # One permutation per fold, so that smaller subsets are inside larger ones.
    orders = [np.random.default_rng([random_state, k]).permutation(train) for k, (train, _) in enumerate(folds)]
    rows = []
    for fraction in sorted(fractions):
        pred = np.zeros_like(y)
        sizes = []
        for (_, test), order in zip(folds, orders, strict=True):
            keep = np.sort(order[: max(MIN_TRAIN, math.ceil(fraction * len(order)))])
            model = build_head(spec, policy.fixed_probe, random_state, n_region_features=X.shape[1],
                               n_learned=n_learned)
            kept_groups = groups[keep] if groups is not None else None
            if kept_groups is not None and len(np.unique(kept_groups)) < 2:
                raise DataError(f"{city.name} {task}: {fraction:.0%} of a training fold holds one spatial block; "
                                "inner CV needs two")
            model.fit(X[keep], y[keep], groups=kept_groups)
            pred[test] = model.predict(X[test])
            sizes.append(len(keep))
        rows.append({"fraction": float(fraction), "n_train": float(np.mean(sizes)), **regression_metrics(y, pred)})
    return pd.DataFrame(rows)
