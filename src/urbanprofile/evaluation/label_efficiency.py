"""Label efficiency: R² of a probe against the number of labelled training regions, on the protocol's own folds.

A curve over :func:`urbanprofile.evaluation.protocols.evaluate_embedding` with ``train_fraction``: each outer
training fold is cut to a fraction of its regions (nested subsets: the 10% are among the 25%, and so on, drawn
with the seed); the probe's settings are still chosen by inner CV on the regions kept, and every test fold is
predicted whole, so the figures at 100% are the protocol's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from urbanprofile.data.city import CityData
from urbanprofile.errors import DataError, MethodUnavailableError
from urbanprofile.evaluation.protocols import evaluate_embedding, get_protocol
from urbanprofile.heads.registry import parse_head

#: Shares of each outer training fold a probe is fit on.
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


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
    rows = []
    for fraction in sorted(fractions):
        # The protocol's own code path, its training folds cut to the share (nested, seeded subsets).
        result = evaluate_embedding(city, embedding, task, protocol=protocol, head=head, random_state=random_state,
                                    train_fraction=fraction)
        rows.append({"fraction": float(fraction), "n_train": float(np.mean(result.n_train)), **result.metrics})
    return pd.DataFrame(rows)
