"""Label efficiency on a suite: R² against the share of each outer training fold that is labelled, per method.

Each method is fit once per (dataset, seed) on every region (embedders never see labels), then probed on 10%, 25%,
50% and 100% of each outer training fold (nested subsets; the probe's settings chosen by inner CV on the regions
kept). Writes ``benchmarks/results/label_efficiency_<suite>.{json,md,png}``.

    URBANPROFILE_DATA=../shared/data URBANPROFILE_INDICATORS=indicators \\
        python benchmarks/label_efficiency.py --suite socioeconomic --methods raw-poi,raw-all,pca,knn-location
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
from common import RESULTS, parse_seeds, parser, write_json, write_text

from urbanprofile.data.registry import list_datasets, load_dataset
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation.label_efficiency import FRACTIONS, label_efficiency
from urbanprofile.evaluation.suites import get_suite, plan_suite
from urbanprofile.methods import get_method


def run(suite_name: str, methods: list[str], protocols: list[str], seeds: list[int], fractions: list[float],
        datasets: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    suite = get_suite(suite_name)
    pairs, skipped = plan_suite(suite, list_datasets(), datasets)
    rows = []
    for dataset, tasks in pairs.items():
        city = load_dataset(dataset)
        present = [t for t in tasks if t in city.tasks]
        skipped += [f"{dataset} {t}: no such task here" for t in tasks if t not in city.tasks]
        for name in methods:
            spec = get_method(name)
            reason = spec.unavailable_reason(city)
            if reason:
                skipped.append(f"{dataset}: {reason}")
                continue
            for seed in seeds if spec.stochastic else seeds[:1]:
                start = time.perf_counter()
                embedding = spec.build(random_state=seed).fit_transform(city)
                for task in present:
                    for protocol in protocols:
                        if protocol == "spatial" and not city.has_locations:
                            continue
                        curve = label_efficiency(city, embedding, task, protocol, spec.head, fractions, seed)
                        for record in curve.to_dict("records"):
                            rows.append({"dataset": dataset, "task": task, "method": name, "protocol": protocol,
                                         "seed": seed, **record})
                print(f"{dataset} {name} seed {seed}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return pd.DataFrame(rows), skipped


def markdown(frame: pd.DataFrame, suite: str) -> str:
    # Mean over seeds per pair first, then over the pairs every method has (as the suite aggregate does).
    per_pair = frame.groupby(["protocol", "method", "dataset", "task", "fraction"])["r2"].mean().reset_index()
    lines = [f"# Label efficiency on suite `{suite}`", "",
             "Mean R² over the pairs every method ran on (mean over seeds per pair), against the share of each "
             "outer training fold that is labelled; probe settings chosen by inner CV on the regions kept.", ""]
    for protocol, part in per_pair.groupby("protocol"):
        wide = part.pivot_table(index=["dataset", "task", "fraction"], columns="method", values="r2").dropna()
        table = wide.groupby(level="fraction").mean()
        n_pairs = len(wide) // max(1, len(table))
        lines += [f"## {protocol} ({n_pairs} pairs)", "",
                  "| share labelled | " + " | ".join(table.columns) + " |",
                  "|---|" + "---|" * len(table.columns)]
        for fraction, values in table.iterrows():
            lines.append(f"| {float(fraction):.0%} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_pair = frame.groupby(["protocol", "method", "dataset", "task", "fraction"])["r2"].mean().reset_index()
    protocols = sorted(set(per_pair["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 3.6), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        wide = per_pair[per_pair["protocol"] == protocol].pivot_table(
            index=["dataset", "task", "fraction"], columns="method", values="r2").dropna()
        table = wide.groupby(level="fraction").mean()
        for method in table.columns:
            ax.plot(table.index * 100, table[method], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 50, 100], ["10%", "25%", "50%", "100%"])
        ax.set_xlabel("share of each training fold labelled")
        ax.set_ylabel("mean R²")
        ax.set_title(protocol)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser_ = parser(__doc__, seeds="0")
    parser_.add_argument("--suite", default="socioeconomic")
    parser_.add_argument("--methods", default="raw-poi,raw-all,pca,knn-location")
    parser_.add_argument("--protocols", default="nested,spatial")
    parser_.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser_.add_argument("--datasets", default=None, help="restrict the suite to these datasets")
    args = parser_.parse_args()
    start = time.perf_counter()
    try:
        frame, skipped = run(args.suite, args.methods.split(","), args.protocols.split(","),
                             parse_seeds(args.seeds), [float(f) for f in args.fractions.split(",")],
                             args.datasets.split(",") if args.datasets else None)
    except UrbanProfileError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if frame.empty:
        print("error: nothing ran", file=sys.stderr)
        return 2
    stem = RESULTS / f"label_efficiency_{args.suite}"
    wall = time.perf_counter() - start
    payload = {"suite": args.suite, "wall_seconds": wall, "skipped": skipped, "rows": frame.to_dict("records")}
    write_json(stem.with_suffix(".json"), payload, default=float)
    text = markdown(frame, args.suite) + f"\nWall time: {wall:.0f} s (`python benchmarks/label_efficiency.py "
    text += " ".join(sys.argv[1:]) + "`).\n"
    write_text(stem.with_suffix(".md"), text)
    plot(frame, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
