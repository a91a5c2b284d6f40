"""Multimodal pretraining (issue 8): UrbanFusion against location, caption and concatenation baselines.

Parts (each prints its table and writes benchmarks/results/multimodal_<part>.json and .md):

- cityview: Beijing and Guangzhou, protocol `spatial`, carbon and population: knn-location, raw-location,
  tfidf-captions, concat and urbanfusion (location + tile captions [+ street-view captions in Beijing]).
- oor: out of region: urbanfusion pretrained on one CityView city only (location + text), embedding the other.
- hafusion: NYC and Chicago, protocol `nested`, 5 seeds: urbanfusion with every modality against the raw
  baselines (raw-poi, raw-landuse, raw-mobility, raw-all).
- robust: missing-modality robustness: one urbanfusion model per city (seed 0), R^2 under `spatial` as each
  modality is dropped at inference; table, plot, and the share of the gain over knn-location kept.
- timing: encoder throughput (sentences/s, images/s, locations/s), the cache's first vs second run, and
  UrbanFusion's pretraining time on Beijing with cached encoder outputs.

    URBANPROFILE_DATA=../shared/data python benchmarks/multimodal.py [--parts cityview,oor,...] [--seeds 0,1,2,3,4]

The machine is shared: torch runs on one thread (--threads to change); encoder outputs are cached on disk.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, environment, md_table, parse_seeds, parser, set_threads, write_results

from urbanprofile.benchmark.runner import BenchmarkPlan, leaderboard, row_to_json, run_benchmark
from urbanprofile.data.city import CityData
from urbanprofile.data.registry import load_dataset
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.methods import MethodSpec, get_method, register_method, with_modalities

CITYVIEW = {"cityview-beijing": ("location", "text", "streetview"), "cityview-guangzhou": ("location", "text")}
TASKS = ["carbon", "population"]
RAW = ["raw-poi", "raw-landuse", "raw-mobility", "raw-all"]
#: Set by ``--fusion-params`` / ``--tag``: urbanfusion's settings for every part, and the results' file suffix.
SETTINGS: dict[str, Any] = {"fusion_params": {}, "tag": ""}


def write(part: str, payload: dict[str, Any], markdown: str) -> None:
    payload = {"part": part, "environment": environment(), "urbanfusion_params": SETTINGS["fusion_params"], **payload}
    if SETTINGS["fusion_params"]:
        markdown += f"\nurbanfusion settings: {json.dumps(SETTINGS['fusion_params'])} (the rest default)\n"
    stem = f"multimodal_{part}{SETTINGS['tag']}"
    write_results(RESULTS, stem, payload, markdown, default=str)
    print(markdown)



def fusion_spec(name: str, **params: Any) -> MethodSpec:
    base = get_method("urbanfusion")
    return register_method(MethodSpec(name, base.factory, {**base.params, **params}, stochastic=True,
                                      family=base.family, description=base.description), replace=True)


def run_grid(cities: dict[str, CityData], methods: list[str], tasks: list[str], protocol: str,
             seeds: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, city in cities.items():
        plan = BenchmarkPlan(datasets=[name], methods=methods, tasks=tasks, protocols=[protocol], seeds=seeds)
        rows += run_benchmark(plan, cities={name: city}, progress=True).rows
    return rows


def board_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    board = leaderboard(rows)
    return [[r["dataset"], r["task"], r["method"], r["r2_mean"], r["r2_std"] if r["n_seeds"] > 1 else "-",
             int(r["n_seeds"]), r["fit_seconds_mean"]] for r in board.to_dict("records")]


# -- parts -------------------------------------------------------------------------------------------
def part_cityview(seeds: list[int]) -> None:
    rows: list[dict[str, Any]] = []
    for name, mods in CITYVIEW.items():
        city = load_dataset(name)
        fusion = with_modalities(get_method("urbanfusion"), list(mods)).name
        concat = with_modalities(get_method("concat"), list(mods)).name
        rows += run_grid({name: city}, ["knn-location", "raw-location", "tfidf-captions", concat, fusion],
                         TASKS, "spatial", seeds)
    table = md_table(["dataset", "task", "method", "R² spatial", "± (seeds)", "seeds", "fit s"], board_rows(rows))
    write("cityview", {"rows": [row_to_json(r) for r in rows]},
          f"## CityView, protocol spatial\n\n{table}")


def part_oor(seeds: list[int]) -> None:
    rows: list[dict[str, Any]] = []
    pairs = [("cityview-beijing", "cityview-guangzhou"), ("cityview-guangzhou", "cityview-beijing")]
    for source, target in pairs:
        city = load_dataset(target)
        spec = fusion_spec(f"urbanfusion[pretrained on {source} only]", pretrain=(source,), include_target=False,
                           train_modalities=("location", "text"))
        same = with_modalities(get_method("urbanfusion"), ["location", "text"]).name
        rows += run_grid({target: city}, [spec.name, same, "knn-location"], TASKS, "spatial", seeds)
    table = md_table(["evaluated on", "task", "method", "R² spatial", "± (seeds)", "seeds", "fit s"],
                     board_rows(rows))
    write("oor", {"rows": [row_to_json(r) for r in rows]},
          f"## Out of region: pretrain on one city, embed and probe the other (spatial)\n\n{table}")


def part_hafusion(seeds: list[int]) -> None:
    rows = run_grid({n: load_dataset(n) for n in ("hafusion-nyc", "hafusion-chicago")}, [*RAW, "urbanfusion"],
                    ["checkin", "crime", "service_calls"], "nested", seeds)
    board = leaderboard(rows)
    wins = []
    for (dataset, task), group in board.groupby(["dataset", "task"]):
        best_raw = group[group["method"].isin(RAW)].sort_values("r2_mean").iloc[-1]
        fusion = group[group["method"] == "urbanfusion"].iloc[0]
        wins.append([dataset, task, best_raw["method"], float(best_raw["r2_mean"]), float(fusion["r2_mean"]),
                     float(fusion["r2_std"]), "yes" if fusion["r2_mean"] > best_raw["r2_mean"] else "no"])
    table = md_table(["dataset", "task", "method", "R² nested", "± (seeds)", "seeds", "fit s"], board_rows(rows))
    verdict = md_table(["dataset", "task", "best raw", "R² best raw", "R² urbanfusion", "±", "urbanfusion wins"],
                       wins)
    n_wins = sum(w[-1] == "yes" for w in wins)
    write("hafusion", {"rows": [row_to_json(r) for r in rows], "wins": wins},
          f"## NYC and Chicago, nested, {len(seeds)} seeds\n\n{table}\n{verdict}\nurbanfusion beats the best raw "
          f"baseline on {n_wins} of {len(wins)} city x task pairs (target: 4 of 6)\n")


def part_robust(seed: int) -> None:
    from urbanprofile.embedders.baselines.raw import Coordinates

    records, plot_data = [], {}
    for name, mods in [*CITYVIEW.items(), ("hafusion-chicago", None)]:
        city = load_dataset(name)
        model = get_method("urbanfusion").build(random_state=seed)
        if mods is not None:
            model.train_modalities = mods
        model.fit(city)
        trained = list(model.names_)
        knn_emb = Coordinates().fit_transform(city)
        tasks = TASKS if name.startswith("cityview") else ["checkin", "crime", "service_calls"]
        for task in tasks:
            knn = evaluate_embedding(city, knn_emb, task, "spatial", "knn", seed).metrics["r2"]
            model.modalities = None
            full = evaluate_embedding(city, model.transform(city), task, "spatial", "ridge", seed).metrics["r2"]
            row = {"dataset": name, "task": task, "knn-location": knn, "all": full}
            for dropped in trained:
                model.modalities = tuple(m for m in trained if m != dropped)
                try:
                    r2 = evaluate_embedding(city, model.transform(city), task, "spatial", "ridge", seed).metrics["r2"]
                except Exception as err:  # e.g. regions left with no modality at all
                    r2 = float("nan")
                    row[f"note_{dropped}"] = str(err)
                row[f"-{dropped}"] = r2
                gain = full - knn
                row[f"kept_{dropped}"] = (r2 - knn) / gain if gain > 0 else float("nan")
            records.append(row)
            plot_data[f"{name} {task}"] = row
    header = ["dataset", "task", "knn-location", "all modalities", "drop", "R² after drop", "share of gain kept"]
    rows = []
    for r in records:
        for key in [k for k in r if k.startswith("-")]:
            kept = r[f"kept_{key[1:]}"]
            rows.append([r["dataset"], r["task"], r["knn-location"], r["all"], key[1:], r[key], kept])
    _robust_plot(records)
    write("robust", {"seed": seed, "records": records},
          f"## Missing-modality robustness (urbanfusion seed {seed}, spatial)\n\n{md_table(header, rows)}\n"
          f"![robustness](multimodal_robust{SETTINGS['tag']}.png)\n")


def _robust_plot(records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3.2), sharey=False)
    for ax, r in zip(np.atleast_1d(axes), records, strict=True):
        keys = ["all", *[k for k in r if k.startswith("-")]]
        ax.bar(range(len(keys)), [r[k] for k in keys], color=["tab:blue"] + ["tab:orange"] * (len(keys) - 1))
        ax.axhline(r["knn-location"], color="k", ls="--", lw=1, label="knn-location")
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{r['dataset'].split('-')[-1]} {r['task']}", fontsize=9)
        ax.set_ylabel("R² (spatial)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"multimodal_robust{SETTINGS['tag']}.png", dpi=110)


def part_timing() -> None:
    from urbanprofile.encoders.image import EfficientNetImageEncoder
    from urbanprofile.encoders.location import GeoCLIPLocationEncoder
    from urbanprofile.encoders.text import MiniLMTextEncoder

    city = load_dataset("cityview-beijing")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["URBANPROFILE_CACHE"] = tmp  # a cold cache for the throughput figures
        texts = list(dict.fromkeys(city.modalities["tile_caption"]["text"]))[:512]
        text = MiniLMTextEncoder()
        text.encode(texts[:8], progress=False)  # load the model
        t0 = time.perf_counter()
        text.encode(texts, progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        MiniLMTextEncoder().encode(texts, progress=False)
        second = time.perf_counter() - t0
        out["text"] = {"items": len(texts), "first_s": first, "per_s": len(texts) / first, "second_run_s": second}
        images = [str(p) for p in sorted((Path(city.meta["source"]).parent.parent / "tiles").rglob("*.jpg"))]
        image = EfficientNetImageEncoder()
        image.encode(images[:1], progress=False)
        t0 = time.perf_counter()
        image.encode(images, cache=False, progress=False)
        elapsed = time.perf_counter() - t0
        out["image"] = {"items": len(images), "first_s": elapsed, "per_s": len(images) / elapsed}
        latlon = city.regions[["lat", "lon"]].to_numpy()
        loc = GeoCLIPLocationEncoder()
        loc.encode(latlon[:4], progress=False)
        t0 = time.perf_counter()
        loc.encode(latlon, cache=False, progress=False)
        elapsed = time.perf_counter() - t0
        out["location"] = {"items": len(latlon), "first_s": elapsed, "per_s": len(latlon) / elapsed}
        del os.environ["URBANPROFILE_CACHE"]
    # Pretraining on Beijing with the encoder outputs cached (the cityview part filled the cache).
    model = get_method("urbanfusion").build(random_state=0)
    model.train_modalities = CITYVIEW["cityview-beijing"]
    t0 = time.perf_counter()
    from urbanprofile.embedders.multimodal.urbanfusion import city_modalities

    city_modalities(city, model.train_modalities, progress=False)
    out["beijing_cached_inputs_s"] = time.perf_counter() - t0
    model.fit(city)
    out["beijing_pretrain_s"] = model.train_seconds_
    out["beijing_regions"] = city.n_regions
    out["epochs"] = model.epochs
    rows = [[k, v["items"], v["per_s"], v["first_s"], v.get("second_run_s", "-")] for k, v in out.items()
            if isinstance(v, dict)]
    table = md_table(["encoder", "items", "items/s", "first run s", "second run (cache) s"], rows)
    write("timing", out, f"## Encoder throughput and pretraining time (1 thread)\n\n{table}\n"
          f"UrbanFusion pretraining on Beijing ({city.n_regions} tiles, {model.epochs} epochs, modalities "
          f"{', '.join(model.train_modalities)}): {out['beijing_pretrain_s']:.1f} s of training after "
          f"{out['beijing_cached_inputs_s']:.1f} s reading the cached encoder outputs\n")


def main() -> None:
    parser_ = parser(__doc__, raw_doc=True, parts="timing,cityview,oor,hafusion,robust", seeds="0,1,2,3,4",
                     seeds_help="seeds of the hafusion part")
    parser_.add_argument("--cityview-seeds", default="0", help="seeds of the cityview and oor parts")
    parser_.add_argument("--threads", type=int, default=1)
    parser_.add_argument("--fusion-params", default="{}",
                         help="urbanfusion settings for every part, as JSON, "
                         "e.g. '{\"lambda_rec\": 1.0, \"readout\": \"tokens\"}'")
    parser_.add_argument("--tag", default="", help="suffix of the results files (e.g. _tokens), so a variant keeps "
                         "the default's files")
    args = parser_.parse_args()
    set_threads(args.threads)
    SETTINGS["fusion_params"] = json.loads(args.fusion_params)
    SETTINGS["tag"] = args.tag
    if SETTINGS["fusion_params"]:
        fusion_spec("urbanfusion", **SETTINGS["fusion_params"])
    seeds = parse_seeds(args.seeds)
    cv_seeds = parse_seeds(args.cityview_seeds)
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        if part == "cityview":
            part_cityview(cv_seeds)
        elif part == "oor":
            part_oor(cv_seeds)
        elif part == "hafusion":
            part_hafusion(seeds)
        elif part == "robust":
            part_robust(cv_seeds[0])
        elif part == "timing":
            part_timing()
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"[{part}] {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
