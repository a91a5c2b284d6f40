"""Coverage of `urbanprofile predict`'s 90% intervals on held-out regions, beside a naive interval; fit+predict time.

For each dataset, task and method, the labelled regions are split by the `spatial` protocol's outer folds (whole
k-means blocks held out) and by the `nested` protocol's random folds. For each fold the held-out labels are
masked, a model is fit on the rest (`fit_model`, settings chosen by the hold-out's own inner CV) and the held-out
regions are predicted (`predict_regions`). Coverage is the share of held-out labels inside the interval; the
naive interval is the prediction plus or minus the level-quantile of the same model's absolute calibration
residuals (one width for every region). Intervals are calibrated on spatial-block out-of-fold residuals
(the default) and, to show why, on random-fold ones. The pooled held-out predictions are compared with
`evaluate_embedding`'s out-of-fold predictions on the same folds (they must be equal: one code path).

    URBANPROFILE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/predict.py [--quick]

Writes benchmarks/results/predict.json and predict.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from urbanprofile import __version__
from urbanprofile.data.registry import load_dataset
from urbanprofile.data.tasks import task_data
from urbanprofile.evaluation.metrics import regression_metrics
from urbanprofile.evaluation.protocols import evaluate_embedding, get_protocol, outer_splits
from urbanprofile.evaluation.spatial import BLOCK_SEED
from urbanprofile.methods import get_method
from urbanprofile.predict import fit_model, load_model, predict_regions
from urbanprofile.predict.output import write_predictions

RESULTS = Path(__file__).parent / "results"
LEVEL = 0.9
CASES = [
    ("hafusion-nyc", "crime"), ("hafusion-nyc", "service_calls"),
    ("hafusion-chicago", "crime"), ("hafusion-chicago", "service_calls"),
    ("cityview-beijing", "carbon"), ("cityview-beijing", "population"),
]
#: The learned method is trained once per dataset (label-free) and its embedding reused by every fold.
METHODS = ["raw-all", "raw-location", "knn-location", "hafusion"]
HOLDOUTS = ["spatial", "nested"]
CALIBRATIONS = ["auto", "spatial", "nested"]


def held_out_run(city: Any, emb: Any, method: str, task: str, holdout: str, calibration: str,
                 work: Path, candidates: dict[str, Any] | None = None, block_seed: int | None = None,
                 interval: str = "normalised") -> dict[str, Any]:
    """Fit on all but one fold, predict it, for every fold of ``holdout``; pooled coverage and widths.

    ``block_seed`` (spatial hold-out only): another layout of the held-out blocks than the protocol's own. The
    models still choose their settings and calibration on their own (default) blocks of the labelled regions, as
    a user's model would: the masked area is simply another one.
    """
    policy = get_protocol(holdout) if block_seed is None else replace(get_protocol(holdout), block_seed=block_seed)
    td = task_data(city, task)
    truth = city.targets[task]
    y_all, pred_all, lo_all, hi_all, naive_all = [], [], [], [], []
    ids = []
    chosen: dict[str, int] = {}
    for k, (_, test) in enumerate(outer_splits(city, td, policy)):
        test_ids = td.region_ids[test]
        targets = city.targets.copy()
        targets.loc[test_ids, task] = np.nan
        masked = replace(city, targets=targets)
        folder = work / f"{city.name}-{method}-{task}-{holdout}-{block_seed}-{calibration}-{interval}-{k}"
        fit_model(masked, method, task, folder, protocol_for_settings=holdout, calibration=calibration,
                  embedding=emb, candidates=candidates, interval=interval)
        model = load_model(folder)
        chosen[model.config["calibration"]] = chosen.get(model.config["calibration"], 0) + 1
        frame = predict_regions(model, masked, level=LEVEL).loc[test_ids]
        q = float(np.quantile(np.abs(model.arrays["cal_residuals"]), LEVEL, method="higher"))
        y = truth.loc[test_ids].to_numpy(dtype=float)
        y = np.log1p(y) if td.scale == "log1p" else y
        y_all.append(y)
        pred_all.append(frame["prediction"].to_numpy())
        lo_all.append(frame["lower"].to_numpy())
        hi_all.append(frame["upper"].to_numpy())
        naive_all.append(np.full(len(test_ids), q))
        ids.append(test_ids)
    y, pred, lo, hi, half = (np.concatenate(a) for a in (y_all, pred_all, lo_all, hi_all, naive_all))
    oof = evaluate_embedding(city, emb, task, protocol=policy, head=get_method(method).head, candidates=candidates)
    oof_pred = oof.predictions()["pred"].loc[np.concatenate([i.to_numpy() for i in ids])].to_numpy()
    naive_lo = np.clip(pred - half, 0, None) if (td.y >= 0).all() else pred - half
    return {
        "dataset": city.name, "task": task, "method": method, "head": get_method(method).head,
        "holdout": holdout, "block_seed": policy.block_seed, "calibration": calibration, "interval": interval,
        "calibration_folds_chosen": chosen, "n_regions": len(y),
        "coverage": float(np.mean((y >= lo) & (y <= hi))), "mean_width": float(np.mean(hi - lo)),
        "naive_coverage": float(np.mean((y >= naive_lo) & (y <= pred + half))),
        "naive_mean_width": float(np.mean(pred + half - naive_lo)),
        "r2_predict": regression_metrics(y, pred)["r2"], "r2_out_of_fold": oof.metrics["r2"],
        "max_abs_diff_vs_out_of_fold": float(np.max(np.abs(pred - oof_pred))),
    }


def timing(data_dir: str | None) -> dict[str, Any]:
    """fit + predict for raw-all + ridge on NYC crime: in-process seconds (data loaded) and the CLI's wall time."""
    city = load_dataset("hafusion-nyc", data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fit_model(city, "raw-all", "crime", Path(tmp) / "model")
        frame = predict_regions(load_model(Path(tmp) / "model"), city, all_regions=True)
        write_predictions(frame, Path(tmp) / "predictions.parquet")
        in_process = time.perf_counter() - start
        cli = [sys.executable, "-m", "urbanprofile.cli"]
        start = time.perf_counter()
        subprocess.run([*cli, "fit", "hafusion-nyc", "--method", "raw-all", "--task", "crime", "--out",
                        str(Path(tmp) / "cli-model")], check=True, capture_output=True)
        subprocess.run([*cli, "predict", str(Path(tmp) / "cli-model"), "--all", "--out",
                        str(Path(tmp) / "cli.parquet")], check=True, capture_output=True)
        cli_wall = time.perf_counter() - start
        # A learned embedder: its own training, then the same fit + predict on its embedding.
        start = time.perf_counter()
        model = fit_model(city, "hafusion", "crime", Path(tmp) / "hafusion")
        frame = predict_regions(load_model(Path(tmp) / "hafusion"), city, all_regions=True)
        write_predictions(frame, Path(tmp) / "hafusion.parquet")
        learned_total = time.perf_counter() - start
    return {"case": "hafusion-nyc crime, raw-all + ridge, fit + predict (all 180 regions)",
            "load_average_1min": os.getloadavg()[0],
            "in_process_seconds": in_process, "cli_wall_seconds": cli_wall,
            "hafusion_training_seconds": model.timings["embed"],
            "hafusion_fit_predict_seconds_beyond_training": learned_total - model.timings["embed"]}


def default_layout(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the protocols' own folds (rows stored before layouts were varied carry no ``block_seed``)."""
    return [r for r in rows if r.get("block_seed", BLOCK_SEED) == BLOCK_SEED]


def layouts_table(rows: list[dict[str, Any]]) -> list[str]:
    """Spatial hold-out, default calibration, over several layouts of the held-out blocks: per case and summary."""
    runs = [r for r in rows if r["holdout"] == "spatial" and r["calibration"] == "auto"
            and r.get("interval", "normalised") == "normalised"]
    seeds = sorted({r.get("block_seed", BLOCK_SEED) for r in runs})
    if len(seeds) < 2:
        return []
    by_case: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in runs:
        by_case.setdefault((r["dataset"], r["task"], r["method"]), {})[r.get("block_seed", BLOCK_SEED)] = r["coverage"]
    complete = {case: cov for case, cov in by_case.items() if all(s in cov for s in seeds)}
    draws = np.array([c for cov in complete.values() for c in cov.values()])
    means = np.array([np.mean(list(cov.values())) for cov in complete.values()])
    lines = [f"## Over {len(seeds)} layouts of the held-out blocks (spatial hold-out, calibration auto)", "",
             f"Block seeds {', '.join(map(str, seeds))} ({BLOCK_SEED} is the protocol's own layout): each seed "
             "clusters the centroids into blocks anew and deals them to the 5 folds; the held-out regions of each "
             "fold are masked and the model is fit on the rest exactly as above (settings and calibration chosen "
             "on the model's own blocks of its labelled regions). Single layouts scatter (the sd column: 0.01-0.07, "
             "more than binomial noise on Beijing's 4,587 tiles, since a layout moves whole areas); the mean over "
             "layouts is the coverage a user can expect for a masked area of that city.",
             "",
             f"Draws in [0.85, 0.95]: **{int(((draws >= 0.85) & (draws <= 0.95)).sum())} of {len(draws)}**; "
             f"cases whose mean over layouts is in [0.85, 0.95]: **{int(((means >= 0.85) & (means <= 0.95)).sum())}"
             f" of {len(means)}** (mean coverage min {means.min():.3f}, median {np.median(means):.3f}, "
             f"max {means.max():.3f}).", "",
             "| dataset | task | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
             "|---|---|---|" + "---|" * (len(seeds) + 2)]
    for (dataset, task, method), cov in complete.items():
        values = [cov[s] for s in seeds]
        lines.append(f"| {dataset} | {task} | {method} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {np.mean(values):.3f} | {np.std(values, ddof=1):.3f} |")
    return [*lines, ""]


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """Coverage over every case per (hold-out, calibration): range, median, share in [0.85, 0.95], width vs naive."""
    lines = ["| hold-out | calibration | interval | cases | coverage min | median | max | cases in [0.85, 0.95] | "
             "median width / naive width | naive coverage min | median | max | naive in [0.85, 0.95] |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    intervals = list(dict.fromkeys(r.get("interval", "normalised") for r in rows))
    for holdout, calibration, interval in ((h, c, i) for i in intervals for h in HOLDOUTS for c in CALIBRATIONS):
        group = [r for r in rows if r["holdout"] == holdout and r["calibration"] == calibration
                 and r.get("interval", "normalised") == interval]
        if group:
            cov = np.array([r["coverage"] for r in group])
            ratio = np.median([r["mean_width"] / r["naive_mean_width"] for r in group])
            inside = int(((cov >= 0.85) & (cov <= 0.95)).sum())
            naive = np.array([r["naive_coverage"] for r in group])
            naive_inside = int(((naive >= 0.85) & (naive <= 0.95)).sum())
            lines.append(f"| {holdout} | {calibration} | {interval} | {len(group)} | {cov.min():.3f} | "
                         f"{np.median(cov):.3f} | "
                         f"{cov.max():.3f} | {inside} | {ratio:.2f} | {naive.min():.3f} | {np.median(naive):.3f} | "
                         f"{naive.max():.3f} | {naive_inside} |")
    return lines


def _calibration_cell(row: dict[str, Any]) -> str:
    """``auto (spatial 3, nested 2)``: what auto chose over the hold-out's folds (``, cv+`` for CV+ intervals)."""
    suffix = ", cv+" if row.get("interval", "normalised") == "cv+" else ""
    if row["calibration"] != "auto":
        return str(row["calibration"]) + suffix
    chosen = row.get("calibration_folds_chosen", {})
    return f"auto ({', '.join(f'{k} {v}' for k, v in sorted(chosen.items(), reverse=True))}){suffix}"


def markdown(rows: list[dict[str, Any]], timings: dict[str, Any]) -> str:
    lines = [
        "# Prediction intervals of `urbanprofile predict` on held-out regions",
        "",
        f"Regenerate: `URBANPROFILE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/predict.py` "
        f"(level {LEVEL:.0%}; seed 0).",
        "Hold-out `spatial`: each of 5 folds of whole k-means blocks held out in turn, the model fit on the rest; "
        "`nested`: 10 random folds. hafusion (seed 0) is trained once per city, label-free, and its "
        "checkpoints reused (each fit chooses one by inner CV on its labelled regions). Calibration: the folds of "
        "the out-of-fold residuals inside `fit`: `auto` (the default: per fold, the folds whose held-out regions lie "
        "as far from training as the masked regions lie from the labelled ones; the folds it chose in brackets), "
        "`spatial` or `nested`. Widths: `--widths auto`, the default (difficulty-scaled where that holds on the "
        "model's own held-out calibration folds, else constant); interval: normalised unless the row says cv+. "
        "Naive: prediction ± the 90% quantile of the same absolute residuals. "
        "Run on a loaded 2-core machine shared with other jobs, cases and methods as "
        "separate processes (`--cases`, `--methods`, `--merge`); the coverages do not depend on that, the timings do. "
        "R² predict = pooled "
        "held-out predictions of `predict`; R² OOF = `evaluate_embedding` on the same folds (equal: one code path).",
        "",
        *summary_table(default_layout(rows)),
        "",
        "| dataset | task | method | head | hold-out | calibration | coverage | mean width | naive coverage | "
        "naive width | R² predict | R² OOF |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in default_layout(rows):
        lines.append(f"| {r['dataset']} | {r['task']} | {r['method']} | {r['head']} | {r['holdout']} | "
                     f"{_calibration_cell(r)} | {r['coverage']:.3f} | {r['mean_width']:.4g} | "
                     f"{r['naive_coverage']:.3f} | {r['naive_mean_width']:.4g} | {r['r2_predict']:.3f} | "
                     f"{r['r2_out_of_fold']:.3f} |")
    lines += ["", f"Timing ({timings['case']}): {timings['in_process_seconds']:.1f} s in process, "
              f"{timings['cli_wall_seconds']:.1f} s wall for the two CLI commands (Python start-up and imports "
              f"included), on this 2-core machine shared with other jobs (1-minute load average "
              f"{timings.get('load_average_1min', float('nan')):.1f}), OMP_NUM_THREADS=1. hafusion + ridge: "
              f"{timings['hafusion_training_seconds']:.1f} s training the embedder, then "
              f"{timings['hafusion_fit_predict_seconds_beyond_training']:.1f} s for the rest of fit + predict.", "",
              *layouts_table(rows)]
    return "\n".join(lines)


def merge(paths: list[Path]) -> int:
    """predict.json / predict.md from per-case row files and a timing file, rows in CASES order."""
    rows: list[dict[str, Any]] = []
    timings: dict[str, Any] = {}
    seconds = 0.0
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["dataset"], row["task"], row["method"], row["holdout"], row["calibration"],
                row.get("interval", "normalised"), row.get("block_seed", BLOCK_SEED))

    for path in paths:
        part = json.loads(path.read_text())
        new = part.get("rows", [])
        replaced = {key(r) for r in new}
        rows = [r for r in rows if key(r) not in replaced] + new
        seconds += float(part.get("seconds", 0.0))
        timings = part.get("timing", timings)
    order = {case: i for i, case in enumerate(CASES)}
    # Stable: each method's hold-out and calibration rows keep the order they were run in.
    rows.sort(key=lambda r: (order.get((r["dataset"], r["task"]), len(order)), METHODS.index(r["method"]),
                             r.get("interval", "normalised") != "normalised", HOLDOUTS.index(r["holdout"]),
                             CALIBRATIONS.index(r["calibration"]), r.get("block_seed", BLOCK_SEED) != BLOCK_SEED,
                             r.get("block_seed", BLOCK_SEED)))
    payload = {"rows": rows, "timing": timings, "level": LEVEL, "seconds": seconds, "urbanprofile": __version__,
               "python": platform.python_version(), "machine": platform.machine(), "processes": len(paths)}
    (RESULTS / "predict.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "predict.md").write_text(markdown(rows, timings))
    print(f"wrote {RESULTS / 'predict.json'} and predict.md ({len(rows)} rows)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="NYC crime only, for a smoke run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--timing-only", action="store_true", help="re-measure the timings into predict.json/md")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite predict.md from predict.json")
    # One process per case (on a shared machine each gets its own share of the CPUs), then --merge.
    parser.add_argument("--cases", default=None, help="dataset:task,... (default: every case)")
    parser.add_argument("--methods", default=None, help="method,... (default: every method)")
    parser.add_argument("--rows-out", default=None, help="write only these cases' rows to this JSON file")
    parser.add_argument("--timing-out", default=None, help="measure only the timings, into this JSON file")
    parser.add_argument("--merge", nargs="+", default=None, help="--rows-out and --timing-out files -> results")
    parser.add_argument("--calibrations", default=",".join(CALIBRATIONS), help="calibration,... to run")
    parser.add_argument("--interval", default="normalised", choices=["normalised", "cv+"], help="fit --interval")
    parser.add_argument("--block-seeds", default=None,
                        help="seed,...: the spatial hold-out only, over these layouts of the held-out blocks "
                             "(with --rows-out; --merge adds them to the results)")
    args = parser.parse_args()
    if args.timing_only:
        payload = json.loads((RESULTS / "predict.json").read_text())
        payload["timing"] = timing(args.data_dir)
        print(json.dumps(payload["timing"]))
        (RESULTS / "predict.json").write_text(json.dumps(payload, indent=2) + "\n")
        (RESULTS / "predict.md").write_text(markdown(payload["rows"], payload["timing"]))
        return 0
    if args.timing_out:
        Path(args.timing_out).write_text(json.dumps({"timing": timing(args.data_dir)}) + "\n")
        return 0
    if args.merge:
        return merge([Path(p) for p in args.merge])
    if args.markdown_only:
        payload = json.loads((RESULTS / "predict.json").read_text())
        (RESULTS / "predict.md").write_text(markdown(payload["rows"], payload["timing"]))
        return 0
    cases = CASES[:1] if args.quick else CASES
    if args.cases:
        cases = [tuple(c.split(":", 1)) for c in args.cases.split(",")]
    rows: list[dict[str, Any]] = []
    embeddings: dict[tuple[str, str], Any] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, task in cases:
            city = load_dataset(dataset, args.data_dir)
            for method in args.methods.split(",") if args.methods else METHODS:
                spec = get_method(method)
                if spec.unavailable_reason(city):
                    continue
                key = (dataset, method)
                if key not in embeddings:
                    embedder = spec.build(random_state=0)
                    embeddings[key] = (embedder.fit_transform(city), getattr(embedder, "candidates_", None))
                emb, candidates = embeddings[key]
                calibrations = args.calibrations.split(",")
                runs = ([("spatial", c, int(seed)) for seed in args.block_seeds.split(",") for c in calibrations]
                        if args.block_seeds else [(h, c, None) for h in HOLDOUTS for c in calibrations])
                for holdout, calibration, block_seed in runs:
                    row = held_out_run(city, emb, method, task, holdout, calibration, Path(tmp), candidates,
                                       block_seed=block_seed, interval=args.interval)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - start
    if args.rows_out:
        Path(args.rows_out).write_text(json.dumps({"rows": rows, "seconds": seconds}) + "\n")
        return 0
    timings = timing(args.data_dir)
    print(json.dumps(timings), flush=True)
    if args.quick:
        return 0
    RESULTS.mkdir(exist_ok=True)
    payload = {"rows": rows, "timing": timings, "level": LEVEL, "seconds": seconds, "urbanprofile": __version__,
               "python": platform.python_version(), "machine": platform.machine()}
    (RESULTS / "predict.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "predict.md").write_text(markdown(rows, timings))
    print(f"wrote {RESULTS / 'predict.json'} and predict.md in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
