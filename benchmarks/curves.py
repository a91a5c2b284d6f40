"""Where representations should pay (issue 20, section 5): label-efficiency curves and transfer across cities.

Parts (each prints its tables and writes benchmarks/results/curves_<part>.json and .md, and a .png):

- label_efficiency: R² against the share of each outer training fold the probe is fit on (10%, 25%, 50%, 100%),
  through ``evaluate_embedding(train_fraction=...)``: seeded nested subsets, the probe's settings still chosen by
  inner CV on the subset only, the test folds unchanged (so 100% is the protocol's own figure). Each
  (method, dataset, seed) is embedded once and its embedding reused for every share, task and protocol; the
  subset is drawn with the seed, so deterministic methods run every seed too. Rows are appended to the JSON as
  each embedding finishes, and a rerun skips the (method, dataset, seed) already there.
- transfer: embedders fit on one city and applied to the other (NYC <-> Chicago) beside the same embedder fit
  in-city, probed on the target city's labels under its own folds. Only inputs that align across the cities
  can transfer: the 26 POI categories (the same columns in both cities' ``poi_dist.npy``). Land use does not
  (11 classes in NYC, 12 in Chicago, unnamed), nor mobility (an N x N matrix over each city's own regions), nor
  the graph methods (hafusion, srel, mvure, mgfn), whose inputs and layers are sized by the city's regions
  (transductive). Beijing <-> Guangzhou for urbanfusion is read from ``multimodal_oor.json``
  (``benchmarks/multimodal.py --parts oor --cityview-seeds 0,1,2``), not rerun here: ``--summarise --parts transfer``
  rewrites ``curves_transfer.md`` from the two JSON files after that run.

    URBANPROFILE_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/curves.py \\
        --parts label_efficiency,transfer --methods raw-poi,raw-all,pca,autoencoder,knn-location --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import md_table

from urbanprofile import __version__
from urbanprofile.data.city import CityData
from urbanprofile.data.registry import load_dataset
from urbanprofile.embedders.base import Embedder, candidates_of
from urbanprofile.embedders.baselines.autoencoder import AutoencoderEmbedder
from urbanprofile.embedders.baselines.pca import PCAEmbedder
from urbanprofile.embedders.baselines.raw import RawViews
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.methods import get_method

RESULTS = Path(__file__).parent / "results"
DATASETS = ["hafusion-nyc", "hafusion-chicago"]
TASKS = ["checkin", "crime", "service_calls"]
PROTOCOLS = ["nested", "spatial"]
FRACTIONS = [0.1, 0.25, 0.5, 1.0]
METHODS = ["raw-poi", "raw-all", "pca", "autoencoder", "knn-location", "hafusion", "srel", "mvure", "mgfn"]
#: Embedders of the transfer part: each reads only the POI view, whose 26 categories are shared by both cities.
TRANSFER: dict[str, Any] = {
    "raw-poi": lambda seed: RawViews(views=("poi_counts",)),
    "pca-poi": lambda seed: PCAEmbedder(n_components=16, views=("poi_counts",), random_state=seed),
    "autoencoder-poi": lambda seed: AutoencoderEmbedder(n_components=16, epochs=300, views=("poi_counts",),
                                                        random_state=seed),
}
#: Label-free baselines that are not raw counts (compact or location-only).
BASELINES = {"pca", "autoencoder", "knn-location", "raw-location"}
TRANSDUCTIVE = {
    "hafusion": "region-region attention over the city's own OD, POI and land-use similarity matrices (N x N)",
    "srel": "a graph over the city's regions and its OD matrix; no embedding for a region outside it",
    "mvure": "graph attention over the city's mobility and similarity graphs (N x N)",
    "mgfn": "mobility-pattern graphs over the city's own regions (7 x N x N)",
}


def environment() -> dict[str, Any]:
    import os

    return {"package_version": __version__, "python": platform.python_version(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()}



def read_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["rows"]) if path.is_file() else []


def write_json(path: Path, part: str, rows: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(exist_ok=True)
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: a killed run never leaves half a file
    tmp.write_text(json.dumps({"part": part, "environment": environment(), "rows": rows}, indent=1, default=str))
    tmp.replace(path)


def fit_embedding(method: str, city: CityData, seed: int) -> tuple[pd.DataFrame, dict[str, pd.DataFrame] | None]:
    """Embed a city once; the candidates (training checkpoints) are what the benchmark runner gives the probe."""
    spec = get_method(method)
    embedder = spec.build(random_state=seed)
    embedding = embedder.fit_transform(city)
    return embedding, candidates_of(embedder)


def part_label_efficiency(methods: list[str], seeds: list[int], datasets: list[str], tasks: list[str],
                          protocols: list[str], fractions: list[float]) -> None:
    path = RESULTS / "curves_label_efficiency.json"
    rows = read_rows(path)
    done = {(r["dataset"], r["method"], r["seed"]) for r in rows}
    cities = {name: load_dataset(name) for name in datasets}
    # Seeds outermost: a run cut short still has every method on its first seeds.
    for seed in seeds:
        for method in methods:
            for name, city in cities.items():
                if (name, method, seed) in done:
                    continue
                reason = get_method(method).unavailable_reason(city)
                if reason:  # e.g. mgfn needs time-of-day OD patterns, which Chicago lacks
                    print(f"{name} {method}: skipped: {reason}", flush=True)
                    continue
                start = time.perf_counter()
                embedding, candidates = fit_embedding(method, city, seed)
                embed_seconds = time.perf_counter() - start
                head = get_method(method).head
                new = []
                for task in tasks:
                    for protocol in protocols:
                        for fraction in fractions:
                            result = evaluate_embedding(city, embedding, task, protocol, head, seed,
                                                        candidates=candidates, train_fraction=fraction)
                            new.append({"dataset": name, "method": method, "seed": seed, "task": task,
                                        "protocol": protocol, "head": head, "train_fraction": fraction,
                                        "n_train": result.n_train, "n_features": embedding.shape[1],
                                        **result.metrics, "embed_seconds": embed_seconds,
                                        "head_seconds": result.head_seconds})
                rows += new
                write_json(path, "label_efficiency", rows)
                print(f"{name} {method} seed {seed}: embedded in {embed_seconds:.0f} s, "
                      f"{len(new)} points", flush=True)
    summarise_label_efficiency(rows)


def summarise_label_efficiency(rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows)
    frame["n_train_mean"] = frame["n_train"].map(np.mean)
    per_seed = frame.groupby(["dataset", "protocol", "method", "train_fraction", "seed"], as_index=False).agg(
        r2=("r2", "mean"), n_train=("n_train_mean", "mean"))
    # Mean over tasks per seed, then mean and spread over seeds.
    curve = per_seed.groupby(["dataset", "protocol", "method", "train_fraction"], as_index=False).agg(
        r2=("r2", "mean"), sd=("r2", "std"), seeds=("seed", "nunique"), n_train=("n_train", "mean"))
    fractions = sorted(frame["train_fraction"].unique())
    lines = ["## Label efficiency: R² (mean of checkin, crime, service_calls; mean over seeds) against the share "
             "of each outer training fold\n",
             "Probe: each method's own head, settings chosen by inner CV on the kept regions only; the test folds "
             "are the protocol's own. `n train` is the mean labelled regions per outer fold at each share.\n"]
    for (dataset, protocol), block in curve.groupby(["dataset", "protocol"]):
        n_train = block.groupby("train_fraction")["n_train"].mean()
        header = ["method", *[f"{f:.0%} (n {n_train[f]:.0f})" for f in fractions], "seeds"]
        table = []
        order = block[block["train_fraction"] == fractions[0]].sort_values("r2", ascending=False)["method"]
        for method in order:
            r = block[block["method"] == method].set_index("train_fraction")
            table.append([method, *[f"{r.loc[f, 'r2']:.3f} ± {0 if np.isnan(r.loc[f, 'sd']) else r.loc[f, 'sd']:.3f}"
                                    if f in r.index else "-" for f in fractions], int(r["seeds"].max())])
        lines.append(f"\n### {dataset}, {protocol}\n\n" + md_table(header, table))
    per_task = frame.groupby(["dataset", "protocol", "task", "method", "train_fraction"], as_index=False)["r2"].mean()
    lines.append("\n## Per task (R², mean over seeds)\n")
    header = ["dataset", "protocol", "task", "method", *[f"{f:.0%}" for f in fractions]]
    table = []
    for key, block in per_task.groupby(["dataset", "protocol", "task", "method"]):
        r = block.set_index("train_fraction")["r2"]
        table.append([*key, *[float(r[f]) if f in r.index else "-" for f in fractions]])
    lines.append(md_table(header, table))
    lines.append(winner_note(curve, fractions))
    markdown = "\n".join(lines)
    (RESULTS / "curves_label_efficiency.md").write_text(markdown)
    print(markdown)
    plot_label_efficiency(curve)


def winner_note(curve: pd.DataFrame, fractions: list[float]) -> str:
    """The best of each family at the smallest and the full share: raw counts, compact baselines, learned methods."""
    family = {"raw counts": lambda m: m.startswith("raw-"), "pca / autoencoder / knn": lambda m: m in BASELINES,
              "learned": lambda m: not m.startswith("raw-") and m not in BASELINES}
    table = []
    for (dataset, protocol), block in curve.groupby(["dataset", "protocol"]):
        for f in (fractions[0], fractions[-1]):
            at = block[block["train_fraction"] == f]
            cells: list[Any] = [dataset, protocol, f"{f:.0%}"]
            best: dict[str, float] = {}
            for name, member in family.items():
                rows = at[at["method"].map(member)].sort_values("r2")
                if rows.empty:
                    cells.append("-")
                    continue
                best[name] = float(rows["r2"].iloc[-1])
                cells.append(f"{rows['method'].iloc[-1]} {best[name]:.3f}")
            gap = best.get("learned", np.nan) - best.get("raw counts", np.nan)
            cells.append("-" if np.isnan(gap) else f"{gap:+.3f}")
            table.append(cells)
    return ("\n## Best of each family (mean R² over tasks and seeds)\n\n"
            + md_table(["dataset", "protocol", "share", "best raw counts", "best pca / autoencoder / knn",
                        "best learned", "learned - raw"], table))


def plot_label_efficiency(curve: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(d, p) for d, p in zip(curve["dataset"], curve["protocol"], strict=True)})
    n_cols = 2
    n_rows = math.ceil(len(keys) / n_cols)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, 3.9 * n_rows), squeeze=False)
    axes = grid.ravel()
    methods = sorted(curve["method"].unique())
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    for ax, (dataset, protocol) in zip(axes, keys, strict=False):
        block = curve[(curve["dataset"] == dataset) & (curve["protocol"] == protocol)]
        for method in methods:
            r = block[block["method"] == method].sort_values("n_train")
            if r.empty:
                continue
            style = "--" if method.startswith("raw-") else "-"
            ax.errorbar(r["n_train"], r["r2"], yerr=r["sd"].fillna(0), label=method, color=colours[method],
                        linestyle=style, marker="o", markersize=3, capsize=2)
        ax.set_xscale("log")
        ticks = block.groupby("train_fraction")["n_train"].mean()
        ax.set_xticks(ticks.to_numpy(), [f"{f:.0%}\n{n:.0f}" for f, n in ticks.items()])
        ax.minorticks_off()
        ax.set_title(f"{dataset}, {protocol}", fontsize=10)
        ax.set_xlabel("share of each training fold / labelled regions per fold", fontsize=8)
        ax.set_ylabel("R² (mean of 3 tasks)", fontsize=8)
        ax.set_ylim(max(-0.5, float(block["r2"].min()) - 0.05), 1.0)  # below -0.5 is off the plot (see the table)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.axis("off")
    # One legend for every method, though a panel may lack one (mgfn has no Chicago panel line).
    shown: dict[str, Any] = {}
    for ax in axes[: len(keys)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            shown.setdefault(label, handle)
    axes[0].legend(list(shown.values()), list(shown), fontsize=7, loc="lower right", ncol=2)
    fig.suptitle("Label efficiency: probe fit on 10/25/50/100% of each outer training fold (mean ± sd over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "curves_label_efficiency.png", dpi=110)
    plt.close(fig)


def part_transfer(seeds: list[int], tasks: list[str], protocols: list[str]) -> None:
    cities = {name: load_dataset(name) for name in DATASETS}
    for name, city in cities.items():
        columns = list(city.views["poi_counts"].columns)
        print(f"{name}: poi_counts {len(columns)} columns ({columns[0]} .. {columns[-1]}), landuse_counts "
              f"{city.views['landuse_counts'].shape[1]} columns")
    rows: list[dict[str, Any]] = []
    pairs = [(DATASETS[0], DATASETS[1]), (DATASETS[1], DATASETS[0])]
    for seed in seeds:
        for method, make in TRANSFER.items():
            for source, target in pairs:
                # Raw counts fit nothing: fit on the other city would be the in-city figure itself.
                for fit_on in (target,) if method == "raw-poi" else (target, source):
                    embedder: Embedder = make(seed)
                    start = time.perf_counter()
                    embedding = embedder.fit(cities[fit_on]).transform(cities[target])
                    embed_seconds = time.perf_counter() - start
                    for task in tasks:
                        for protocol in protocols:
                            result = evaluate_embedding(cities[target], embedding, task, protocol, "ridge", seed)
                            rows.append({"target": target, "fit_on": fit_on, "in_city": fit_on == target,
                                         "method": method, "seed": seed, "task": task, "protocol": protocol,
                                         **result.metrics, "embed_seconds": embed_seconds})
    write_json(RESULTS / "curves_transfer.json", "transfer", rows)
    summarise_transfer(rows)


def summarise_transfer(rows: list[dict[str, Any]]) -> None:
    """Write ``curves_transfer.md`` from the NYC <-> Chicago rows and, when it exists, ``multimodal_oor.json``."""
    seeds = sorted({int(r["seed"]) for r in rows})
    frame = pd.DataFrame(rows)
    mean = frame.groupby(["target", "protocol", "task", "method", "in_city"])["r2"].mean().unstack("in_city")
    table = []
    for (target, protocol, task, method), r in mean.iterrows():
        in_city = float(r.get(True, np.nan))
        across = float(r.get(False, np.nan)) if False in r.index else np.nan
        table.append([target, protocol, task, method, in_city, "-" if np.isnan(across) else across,
                      "-" if np.isnan(across) else across - in_city])
    lines = ["## Transfer NYC <-> Chicago: embedder fit on the other city (POI view only), probed on the target "
             f"city's labels and folds; R², mean over seeds {seeds}\n",
             md_table(["target", "protocol", "task", "method", "fit in-city", "fit on the other city",
                       "transfer - in-city"], table),
             "\nMean over the three tasks:\n",
             md_table(["target", "protocol", "method", "fit in-city", "fit on the other city"],
                      [[t, p, m, float(r.get(True, np.nan)),
                        "-" if False not in r.index or np.isnan(r[False]) else float(r[False])]
                       for (t, p, m), r in frame.groupby(["target", "protocol", "method", "in_city"])["r2"].mean()
                       .unstack("in_city").iterrows()]),
             "\nNot transferable (transductive: inputs and layers sized by the city's own regions):\n",
             *[f"- `{m}`: {why}" for m, why in TRANSDUCTIVE.items()],
             "- land use: 11 classes in NYC, 12 in Chicago, unnamed in the data: no shared categories.",
             "- mobility (`raw-mobility`, `raw-all`, `pca`/`autoencoder` on all views): an N x N OD matrix over "
             "each city's own regions.\n"]
    oor = RESULTS / "multimodal_oor.json"
    if oor.is_file():
        lines += oor_section(json.loads(oor.read_text())["rows"])
    markdown = "\n".join(lines)
    (RESULTS / "curves_transfer.md").write_text(markdown)
    print(markdown)


#: The three kinds of row of ``multimodal_oor.json``, by method name.
OOR_COLUMNS = ("knn-location", "urbanfusion in-city", "urbanfusion other city only")


def oor_kind(method: str) -> str:
    """Which column of the Beijing <-> Guangzhou table a ``multimodal_oor`` method's rows go to."""
    if method == "knn-location":
        return OOR_COLUMNS[0]
    if method.startswith("urbanfusion[pretrained on "):
        return OOR_COLUMNS[2]
    if method.startswith("urbanfusion"):
        return OOR_COLUMNS[1]
    raise ValueError(f"multimodal_oor.json: unexpected method {method!r}")


def oor_section(rows: list[dict[str, Any]]) -> list[str]:
    """The Beijing <-> Guangzhou table: per target and task, R² mean ± sd over seeds of ``knn-location``, urbanfusion
    pretrained on the target city and on the other city only, and the differences of those means.

    Args:
        rows: The result rows of ``multimodal_oor.json`` (``dataset``, ``task``, ``method``, ``seed``, ``protocol``,
            ``r2``).

    Returns:
        The section's Markdown lines.
    """
    frame = pd.DataFrame([{"dataset": r["dataset"], "task": r["task"], "kind": oor_kind(r["method"]),
                           "seed": int(r["seed"]), "r2": float(r["r2"]), "protocol": r["protocol"]} for r in rows])
    protocols = sorted(frame["protocol"].unique())
    stats = frame.groupby(["dataset", "task", "kind"])["r2"].agg(["mean", "std", "count"])
    seeds = sorted(frame.loc[frame["kind"] != OOR_COLUMNS[0], "seed"].unique())

    def cell(key: tuple[str, str, str]) -> str:
        if key not in stats.index:
            return "-"
        r = stats.loc[key]
        return f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["count"] > 1 else "")

    def diff(key: tuple[str, str], a: str, b: str) -> str:
        if (*key, a) not in stats.index or (*key, b) not in stats.index:
            return "-"
        return f"{stats.loc[(*key, a), 'mean'] - stats.loc[(*key, b), 'mean']:+.3f}"

    table = []
    for dataset, task in sorted({(d, t) for d, t in zip(frame["dataset"], frame["task"], strict=True)}):
        key = (dataset, task)
        table.append([dataset, task, *[cell((*key, c)) for c in OOR_COLUMNS],
                      diff(key, OOR_COLUMNS[1], OOR_COLUMNS[0]), diff(key, OOR_COLUMNS[2], OOR_COLUMNS[1]),
                      diff(key, OOR_COLUMNS[2], OOR_COLUMNS[0])])
    return [f"\n## Transfer Beijing <-> Guangzhou (urbanfusion on location + tile captions, from "
            f"`benchmarks/multimodal.py --parts oor`), {', '.join(protocols)}; R², mean ± sd over seeds "
            f"{[int(s) for s in seeds]} (`knn-location` is deterministic: one run)\n",
            md_table(["evaluated on", "task", *OOR_COLUMNS, "in-city - knn-location", "other city - in-city",
                      "other city - knn-location"], table)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="label_efficiency,transfer")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--summarise", action="store_true",
                        help="only rewrite the tables (and plot) of the parts in --parts from their JSON results")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, protocols = args.tasks.split(","), args.protocols.split(",")
    if args.summarise:
        for part in args.parts.split(","):
            if part == "label_efficiency":
                summarise_label_efficiency(read_rows(RESULTS / "curves_label_efficiency.json"))
            elif part == "transfer":
                summarise_transfer(read_rows(RESULTS / "curves_transfer.json"))
            else:
                raise SystemExit(f"error: unknown part {part!r}; valid: label_efficiency, transfer")
        return
    for part in args.parts.split(","):
        if part == "label_efficiency":
            part_label_efficiency(args.methods.split(","), seeds, args.datasets.split(","), tasks, protocols,
                                  [float(f) for f in args.fractions.split(",")])
        elif part == "transfer":
            part_transfer(seeds, tasks, protocols)
        else:
            raise SystemExit(f"error: unknown part {part!r}; valid: label_efficiency, transfer")


if __name__ == "__main__":
    main()
