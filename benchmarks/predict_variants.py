"""Calibration variants for `predict`'s intervals, compared on development cases that are not the reported ones.

The reported coverage (benchmarks/predict.py: NYC and Chicago crime and 311, CityView Beijing carbon and
population) must not choose the method. This script holds out regions the same way on other cases (NYC and
Chicago check-ins, CityView Guangzhou carbon and population; raw-all, raw-location, knn-location) with
`spatial` calibration, keeps every piece an interval needs per fold, and scores these variants on them:

- ``normalised``: what `fit` does: the full model's prediction +- the conformal quantile of the out-of-fold
  residuals divided by their difficulty, times the region's difficulty (CV conformal, not CV+);
- ``naive``: the same without the difficulty (one width everywhere);
- ``cv+`` / ``cv+ naive``: CV+ (Barber et al. 2021): the quantiles of each fold model's prediction at the new
  region +- that fold's residuals (normalised / not);
- ``weighted h``: weighted conformal (Tibshirani et al. 2019) with Gaussian weights on log(1 + km) between the
  calibration region's distance to its training fold and the new region's distance to the labelled set;
- ``mondrian``: Mondrian conformal over three bins of that distance;
- ``floor f k n``: the difficulty with another offset (f x median residual) and n neighbours.

    URBANPROFILE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/predict_variants.py [--from pieces.json]

Writes benchmarks/results/predict_variants.md (and the pieces to --save, to re-score without refitting).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from urbanprofile.data.registry import load_dataset
from urbanprofile.data.tasks import task_data
from urbanprofile.evaluation.protocols import get_protocol, outer_splits
from urbanprofile.heads.registry import build_head, parse_head
from urbanprofile.methods import get_method
from urbanprofile.predict import fit_model, load_model, predict_regions
from urbanprofile.predict.applicability import nearest_distance
from urbanprofile.predict.conformal import N_DIFFICULTY_NEIGHBOURS, EmbeddingSpace, neighbour_mean

RESULTS = Path(__file__).parent / "results"
LEVEL = 0.9
DEV_CASES = [("hafusion-nyc", "checkin"), ("hafusion-chicago", "checkin"), ("cityview-guangzhou", "carbon"),
             ("cityview-guangzhou", "population")]
METHODS = ["raw-all", "raw-location", "knn-location"]
VARIANTS = {
    "normalised": ("cur", {}), "naive": ("naive", {}), "cv+": ("cvplus", {}), "cv+ naive": ("cvplus_naive", {}),
    "weighted h=0.5": ("dw", {"h": 0.5}), "weighted h=0.25": ("dw", {"h": 0.25}), "mondrian 3 bins": ("mond", {}),
    "floor 1 k 25": ("floor", {"floor": 1.0, "k": 25}), "floor 2 k 25": ("floor", {"floor": 2.0, "k": 25}),
    "floor 1 k 50": ("floor", {"floor": 1.0, "k": 50}),
}


def collect(data_dir: str | None) -> list[dict[str, Any]]:
    """Per case, hold-out and fold: labels, predictions, the calibration arrays and the fold models' predictions."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, task in DEV_CASES:
            city = load_dataset(dataset, data_dir)
            for method in METHODS:
                spec = get_method(method)
                if spec.unavailable_reason(city):
                    continue
                emb = spec.build(random_state=0).fit_transform(city)
                td = task_data(city, task)
                for holdout in ("spatial", "nested"):
                    for k, (_, test) in enumerate(outer_splits(city, td, holdout)):
                        records.append(_pieces(city, emb, method, task, holdout, k, td.region_ids[test], Path(tmp)))
                print(dataset, task, method, flush=True)
    return records


def _pieces(city: Any, emb: Any, method: str, task: str, holdout: str, k: int, test_ids: Any,
            tmp: Path) -> dict[str, Any]:
    spec = get_method(method)
    targets = city.targets.copy()
    targets.loc[test_ids, task] = np.nan
    masked = replace(city, targets=targets)
    folder = tmp / f"{city.name}-{method}-{task}-{holdout}-{k}"
    fit_model(masked, method, task, folder, protocol_for_settings=holdout, calibration="spatial", embedding=emb)
    model = load_model(folder)
    frame = predict_regions(model, masked, level=LEVEL).loc[test_ids]
    y = city.targets[task].loc[test_ids].to_numpy(float)
    y = np.log1p(y) if model.config["task_scale"] == "log1p" else y
    a = model.arrays
    space = EmbeddingSpace(bool(model.config["space_log"]), a["space_mean"], a["space_scale"])
    folds = model.training["fold"].to_numpy()
    d_cal = np.zeros(len(folds))
    for f in np.unique(folds):
        inside = folds == f
        d_cal[inside] = nearest_distance(a["labelled_km"][~inside], a["labelled_km"][inside])
    # CV+ needs each calibration fold's model at the new regions: fit as evaluate_embedding fits them.
    mtd = task_data(masked, task)
    policy = get_protocol("spatial")
    X = emb.loc[mtd.region_ids].to_numpy(float)
    groups = policy.inner_groups(masked, mtd)
    assert groups is not None
    X_test = emb.loc[test_ids].to_numpy(float)
    splits = policy.splits(masked, mtd)
    fold_preds = np.zeros((len(splits), len(test_ids)))
    for j, (train, _) in enumerate(splits):
        head = build_head(parse_head(spec.head), False, 0, n_region_features=X.shape[1],
                          n_learned=int(emb.columns.str.startswith("emb_").sum()))
        fold_preds[j] = head.fit(X[train], mtd.y[train], groups=groups[train]).predict(X_test)
    return {"dataset": city.name, "task": task, "method": method, "holdout": holdout, "k": k, "y": y.tolist(),
            "pred": frame["prediction"].tolist(), "d_test": frame["spatial_distance_km"].tolist(),
            "Zt": space.transform(X_test).tolist(), "Zl": a["Z_labelled"].tolist(), "absr": a["abs_residuals"].tolist(),
            "cal_res": a["cal_residuals"].tolist(), "cal_sig": a["cal_sigmas"].tolist(),
            "floor": model.config["difficulty_floor"], "folds": folds.tolist(), "d_cal": d_cal.tolist(),
            "fold_preds": fold_preds.tolist(), "nonneg": bool(model.config["labels_non_negative"])}


def _kth(scores: np.ndarray, level: float) -> float:
    k = math.ceil((len(scores) + 1) * level)
    return np.inf if k > len(scores) else float(np.sort(scores)[k - 1])


def _weighted_quantile(scores: np.ndarray, weights: np.ndarray, level: float) -> float:
    order = np.argsort(scores)
    mass = np.cumsum(weights[order]) / (weights.sum() + 1.0)  # the new region's own weight is K(0) = 1
    at = int(np.searchsorted(mass, level, side="left"))
    return np.inf if at >= len(scores) else float(scores[order][at])


def intervals(rec: dict[str, Any], kind: str, h: float = 0.5, floor: float = 0.5,
              k: int = N_DIFFICULTY_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, lower, upper) of one fold's held-out regions under a variant."""
    y, pred, d_test = (np.array(rec[key]) for key in ("y", "pred", "d_test"))
    residuals, cal_sig, d_cal = (np.array(rec[key]) for key in ("cal_res", "cal_sig", "d_cal"))
    folds, fold_preds = np.array(rec["folds"]), np.array(rec["fold_preds"])
    Zl, absr, Zt = np.array(rec["Zl"]), np.array(rec["absr"]), np.array(rec["Zt"])
    test_sig = neighbour_mean(Zl, absr, Zt, N_DIFFICULTY_NEIGHBOURS) + rec["floor"]
    if kind == "floor":
        offset = floor * float(np.median(absr))
        n = min(k, len(Zl) - 1)
        _, idx = NearestNeighbors(n_neighbors=n + 1).fit(Zl).kneighbors(Zl)
        others = [row[row != i][:n] for i, row in enumerate(idx)]
        cal_sig = np.array([absr[o].mean() for o in others]) + offset
        test_sig = neighbour_mean(Zl, absr, Zt, k) + offset
        kind = "cur"
    normalised = "naive" not in kind
    scores = np.abs(residuals) / cal_sig if normalised else np.abs(residuals)
    sig = test_sig if normalised else np.ones_like(test_sig)
    if kind in ("cur", "naive"):
        q = _kth(scores, LEVEL)
        lower, upper = pred - q * sig, pred + q * sig
    elif kind.startswith("cvplus"):
        n, alpha = len(scores), 1 - LEVEL
        k_low, k_high = math.floor(alpha * (n + 1)), math.ceil((1 - alpha) * (n + 1))
        lower, upper = np.empty(len(y)), np.empty(len(y))
        for j in range(len(y)):
            centre = fold_preds[folds, j]
            lower[j] = -np.inf if k_low < 1 else np.sort(centre - scores * sig[j])[k_low - 1]
            upper[j] = np.inf if k_high > n else np.sort(centre + scores * sig[j])[k_high - 1]
    elif kind == "dw":
        q = np.array([_weighted_quantile(scores, np.exp(-0.5 * ((np.log1p(d_cal) - np.log1p(d)) / h) ** 2), LEVEL)
                      for d in d_test])
        lower, upper = pred - q * sig, pred + q * sig
    else:  # mondrian
        edges = np.quantile(d_cal, [1 / 3, 2 / 3])
        cal_bin, test_bin = np.searchsorted(edges, d_cal), np.searchsorted(edges, d_test)
        q = np.array([_kth(scores[cal_bin == b], LEVEL) for b in test_bin])
        lower, upper = pred - q * sig, pred + q * sig
    if rec["nonneg"]:
        lower = np.maximum(lower, 0.0)
    return y, lower, upper


def score(records: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["dataset"], rec["task"], rec["method"], rec["holdout"])].append(rec)
    result: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (_, _, _, holdout), recs in groups.items():
        for name, (kind, params) in VARIANTS.items():
            parts = [intervals(r, kind, **params) for r in recs]
            y, lower, upper = (np.concatenate([p[i] for p in parts]) for i in range(3))
            width = upper - lower
            result[(holdout, name)].append((float(np.mean((y >= lower) & (y <= upper))),
                                            float(np.mean(width)) if np.isfinite(width).all() else np.inf))
    lines = ["| hold-out | variant | cases | coverage min | median | max | in [0.85, 0.95] | "
             "mean abs(coverage - 0.9) | median width / normalised | cases with an infinite interval |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for holdout in ("spatial", "nested"):
        base = np.array([w for _, w in result[(holdout, "normalised")]])
        for name in VARIANTS:
            cov = np.array([c for c, _ in result[(holdout, name)]])
            width = np.array([w for _, w in result[(holdout, name)]])
            finite = np.isfinite(width)
            lines.append(f"| {holdout} | {name} | {len(cov)} | {cov.min():.3f} | {np.median(cov):.3f} | "
                         f"{cov.max():.3f} | {int(((cov >= 0.85) & (cov <= 0.95)).sum())} | "
                         f"{np.mean(np.abs(cov - LEVEL)):.3f} | {np.median(width[finite] / base[finite]):.3f} | "
                         f"{int((~finite).sum())} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--from", dest="source", default=None, help="re-score pieces saved by --save")
    parser.add_argument("--save", default=None, help="keep the collected pieces (JSON)")
    args = parser.parse_args()
    records = json.loads(Path(args.source).read_text()) if args.source else collect(args.data_dir)
    if args.save:
        Path(args.save).write_text(json.dumps(records))
    table = score(records)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_variants.md").write_text(
        "# Calibration variants on development cases (not the reported ones)\n\n"
        "Regenerate: `URBANPROFILE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/predict_variants.py` "
        f"(level {LEVEL:.0%}, seed 0, `spatial` calibration; cases: "
        f"{', '.join(f'{d} {t}' for d, t in DEV_CASES)} x {', '.join(METHODS)} where available). Each variant is "
        "described in the script's docstring; widths are relative to `normalised` (what `fit` does).\n\n"
        + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
