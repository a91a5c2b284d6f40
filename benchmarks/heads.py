"""Task-aware heads: Prompt4RE on Chicago, UrbanMoE against MLPs and Ridge, SmolLM2 prompt-vector time.

Parts (``--parts``, comma-separated; default all):

* ``smollm2``: SmolLM2-135M prompt vectors for Chicago's 77 regions x 4 prompts (3 task prompts + task-free),
  cold (the vector cache entry removed first) and again (read from the cache); wall and process CPU time.
* ``prompt``: Chicago, ``nested``, embedder ``pca`` (``--method`` picks another; its results then go to
  ``heads_prompt_<method>``): ridge vs Prompt4RE heads with Llama / Qwen / MiniLM / SmolLM2 vectors and
  their ablations (no task prompt, no alignment = concat), all-regions vs per-region attention, beside
  ToPT's published Table 1 (selected on test folds; marked as such).
* ``moe``: ``modalities`` embedding (one block per modality) on NYC, Chicago (3 tasks) and CityView Beijing
  and Guangzhou (carbon, population, gdp): ridge, single-task MLP, dense multi-task MLP and UrbanMoE on the
  same joint folds (``nested``; CityView also ``spatial``), plus an expert-utilisation table and plot.

Every head is fit inside each outer fold on its training regions only. Results go to
``benchmarks/results/heads_<part>.json`` and ``.md``. The machine is shared: torch runs on one thread, and
the seed lists are set per part (``--seeds``; see the printed tables for what ran).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import pandas as pd
from common import RESULTS, parse_seeds, parser, set_threads, write_results

TOPT_TABLE1 = {  # ToPT (Chicago), R^2; epochs selected on the test folds in the released code
    "ToPT": {"crime": 0.874, "checkin": 0.986, "service_calls": 0.874},
    "w/o Prompt4RE": {"crime": 0.781, "checkin": 0.931, "service_calls": 0.768},
    "w/o task prompt": {"crime": 0.858, "checkin": 0.972, "service_calls": 0.833},
    "w/o P-R alignment": {"crime": 0.805, "checkin": 0.941, "service_calls": 0.811},
}
TASKS = ("checkin", "crime", "service_calls")


def _write(part: str, payload: dict[str, Any], markdown: str) -> None:
    write_results(RESULTS, f"heads_{part}", payload, markdown, default=float)
    print(markdown, flush=True)


def _md(frame: pd.DataFrame) -> str:
    """A markdown table (floats to 3 decimals, missing as '-')."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if isinstance(value, float | np.floating):
            return f"{float(value):.3f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# -- smollm2 ----------------------------------------------------------------------------------------------
def part_smollm2(n_regions: int) -> None:
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.encoders.llm import LLMPromptEncoder, cache_dir
    from urbanprofile.heads.prompts import geo_texts, task_prompt

    city = load_dataset("hafusion-chicago")
    prefixes = geo_texts(city)[:n_regions]
    suffixes = ["", *("\n\n" + task_prompt(t) for t in city.tasks)]
    encoder = LLMPromptEncoder("smollm2")
    t0 = time.perf_counter()
    encoder.load_model()  # converts the GGUF once per machine (cached), then loads
    load_s = time.perf_counter() - t0
    from urbanprofile.encoders.llm import text_hash

    key = encoder.cache_key("pairs", text_hash(prefixes), text_hash(suffixes))
    cached = cache_dir() / "vectors" / f"{key}.npy"
    cached.unlink(missing_ok=True)
    runs = []
    for label in ("cold", "cached"):
        wall, cpu = time.perf_counter(), time.process_time()
        vectors = LLMPromptEncoder("smollm2").encode_pairs(prefixes, suffixes) if label == "cached" else \
            encoder.encode_pairs(prefixes, suffixes)
        runs.append({"run": label, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                     "shape": list(vectors.shape)})
    load = os.getloadavg()[0]
    frame = pd.DataFrame(runs)
    cold = runs[0]
    md = (f"### SmolLM2-135M prompt vectors, Chicago {len(prefixes)} of 77 regions x {len(suffixes)} prompts\n\n"
          f"{_md(frame)}\nCPU time scaled to all 77 regions: {cold['cpu_s'] * 77 / len(prefixes):.0f} s.\n"
          f"Model load (GGUF conversion cached): {load_s:.1f} s. torch threads: {_threads()}. "
          f"1-min load average at the end: {load:.1f} on 2 cores (the machine is shared).\n")
    _write("smollm2", {"runs": runs, "load_s": load_s, "loadavg": load}, md)


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


# -- prompt ------------------------------------------------------------------------------------------------
PROMPT_HEADS = (
    "ridge",
    "prompt4re-llama", "prompt4re-llama-notask", "concat-llama", "prompt4re-llama-region",
    "prompt4re-qwen", "concat-qwen",
    "prompt4re-minilm", "prompt4re-minilm-notask", "concat-minilm",
    "prompt4re-smollm2", "prompt4re-smollm2-notask", "concat-smollm2",
)


def part_prompt(seeds: list[int], heads: list[str], method: str) -> None:
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.evaluation.protocols import evaluate_embedding
    from urbanprofile.methods import get_method

    city = load_dataset("hafusion-chicago")
    out_path = RESULTS / f"heads_{_prompt_part(method)}.json"
    rows: list[dict[str, Any]] = []
    if out_path.is_file():  # resume: keep finished (head, seed, task) cells
        rows = json.loads(out_path.read_text()).get("rows", [])
    done = {(r["head"], r["seed"], r["task"]) for r in rows}
    for seed in seeds:
        spec = get_method(method)
        embedding = spec.build(random_state=seed).fit_transform(city)
        for head in heads:
            seeds_needed = seeds if head != "ridge" or spec.stochastic else seeds[:1]
            if seed not in seeds_needed:
                continue
            for task in TASKS:
                if (head, seed, task) in done:
                    continue
                t0 = time.perf_counter()
                result = evaluate_embedding(city, embedding, task, "nested", head, seed)
                epochs = [c.get("epochs") for c in result.chosen if "epochs" in c]
                rows.append({"head": head, "seed": seed, "task": task, **result.metrics,
                             "seconds": time.perf_counter() - t0,
                             "epochs_median": float(np.median(epochs)) if epochs else None,
                             "epochs_zero_share": float(np.mean(np.array(epochs) == 0)) if epochs else None})
                print(json.dumps(rows[-1]), flush=True)
                _write_prompt(rows, method)


def _prompt_part(method: str) -> str:
    """Results stem of the prompt part: ``prompt`` for the default embedder, ``prompt_<method>`` otherwise."""
    return "prompt" if method == "pca" else f"prompt_{method.replace('+', '_')}"


def _write_prompt(rows: list[dict[str, Any]], method: str) -> None:
    frame = pd.DataFrame(rows)
    table = frame.groupby(["head", "task"]).agg(r2=("r2", "mean"), r2_std=("r2", "std"), mae=("mae", "mean"),
                                                 rmse=("rmse", "mean"), seeds=("seed", "nunique"),
                                                 epochs=("epochs_median", "median"),
                                                 at_ridge_start=("epochs_zero_share", "mean")).reset_index()
    wide = table.pivot(index="head", columns="task", values="r2").reindex(columns=list(TASKS))
    seeds = table.groupby("head")["seeds"].max()
    wide["mean R²"] = wide.mean(axis=1)
    wide["seeds"] = seeds
    wide = wide.reset_index()
    order = {h: i for i, h in enumerate(PROMPT_HEADS)}
    wide = wide.sort_values("head", key=lambda s: s.map(lambda h: order.get(h, 99)))
    ridge = table[table["head"] == "ridge"].set_index("task")["r2"]
    wins = {}
    for head in wide["head"]:
        if head == "ridge" or ridge.empty:
            continue
        mine = table[table["head"] == head].set_index("task")["r2"]
        wins[head] = int(sum(mine.get(t, -np.inf) > ridge.get(t, np.inf) for t in TASKS))
    wide["tasks beating ridge"] = wide["head"].map(lambda h: f"{wins[h]} of {len(TASKS)}" if h in wins else "-")
    published = pd.DataFrame([{"head": f"ToPT paper: {k} (SREL, test-selected epochs)", **v}
                              for k, v in TOPT_TABLE1.items()])
    md = (f"### Prompt4RE heads on Chicago, `nested`, embedder `{method}`: R² (mean over seeds)\n\n{_md(wide)}\n"
          f"Published (ToPT Table 1, their SREL embedding; epochs chosen on the test folds):\n\n"
          f"{_md(published)}\nDetail (MAE, RMSE, median chosen epochs, share of folds left at the ridge start, "
          "i.e. predicting exactly what the `ridge` head predicts):"
          f"\n\n{_md(table)}")
    _write(_prompt_part(method), {"rows": rows, "method": method}, md)


# -- moe ---------------------------------------------------------------------------------------------------
MOE_HEADS = ("ridge", "mlp", "mlp-multitask", "moe")


def part_moe(seeds: list[int], cityview_seeds: list[int], datasets: list[str]) -> None:
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.evaluation.protocols import evaluate_tasks
    from urbanprofile.methods import get_method

    out_path = RESULTS / "heads_moe.json"
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}  # resume: rows and utilisation
    rows: list[dict[str, Any]] = previous.get("rows", [])
    done = {(r["dataset"], r["protocol"], r["head"], r["seed"]) for r in rows}
    utilisation: dict[str, Any] = previous.get("utilisation", {})
    for name in datasets:
        city = load_dataset(name)
        embedding = get_method("modalities").build(0).fit_transform(city)
        cityview = name.startswith("cityview")
        protocols = ["nested", "spatial"] if cityview else ["nested"]
        for protocol in protocols:
            for seed in cityview_seeds if cityview else seeds:
                for head in MOE_HEADS:
                    if (name, protocol, head, seed) in done:
                        continue
                    t0 = time.perf_counter()
                    results = evaluate_tasks(city, embedding, list(city.tasks), protocol, head, seed)
                    seconds = time.perf_counter() - t0
                    for r in results:
                        rows.append({"dataset": name, "protocol": protocol, "head": head, "seed": seed,
                                     "task": r.task, **r.metrics, "seconds": seconds})
                    print(name, protocol, head, seed, [round(r.metrics["r2"], 3) for r in results],
                          f"{seconds:.0f}s", flush=True)
                    _write_moe(rows, utilisation)
        utilisation[name] = _utilisation(city, embedding)
        _write_moe(rows, utilisation)


def _utilisation(city: Any, embedding: pd.DataFrame) -> dict[str, Any]:
    """Expert utilisation of a moe fit on the first nested fold's training regions, on its test regions."""
    from urbanprofile.evaluation.protocols import joint_regions, outer_splits
    from urbanprofile.heads.moe import UrbanMoE
    from urbanprofile.heads.registry import embedding_blocks

    union, per_task = joint_regions(city, list(city.tasks))
    X = embedding.loc[union.region_ids].to_numpy(dtype=float)
    Y = np.full((len(X), len(per_task)), np.nan)
    position = pd.Series(np.arange(len(X)), index=union.region_ids)
    for j, td in enumerate(per_task.values()):
        Y[position.loc[td.region_ids].to_numpy(), j] = td.y
    train, test = outer_splits(city, union, "nested")[0]
    names, blocks = embedding_blocks(embedding.columns)
    model = UrbanMoE(blocks=blocks, block_names=names, random_state=0).fit(X[train], Y[train])
    table = model.expert_utilisation(X[test], list(per_task))
    weights = model.expert_utilisation(X[test], list(per_task), weights=True)
    return {"table": table.round(3).reset_index().to_dict("records"),
            "weights": weights.round(3).reset_index().to_dict("records"), "epochs": model.epochs_}


def _write_moe(rows: list[dict[str, Any]], utilisation: dict[str, Any]) -> None:
    if not rows:
        return
    frame = pd.DataFrame(rows)
    per_task = frame.groupby(["dataset", "protocol", "head", "task"])["r2"].mean().unstack("task")
    mean = frame.groupby(["dataset", "protocol", "head", "seed"])["r2"].mean()
    summary = mean.groupby(["dataset", "protocol", "head"]).agg(["mean", "std", "count"])
    summary.columns = ["mean R² over tasks", "std over seeds", "seeds"]
    table = per_task.join(summary).reset_index()
    verdicts = []
    for (dataset, protocol), group in table.groupby(["dataset", "protocol"]):
        scores = group.set_index("head")["mean R² over tasks"]
        if {"moe", "mlp"} <= set(scores.index):
            verdicts.append({"dataset": dataset, "protocol": protocol, "moe": scores["moe"], "mlp": scores["mlp"],
                             "moe beats single-task MLP": bool(scores["moe"] > scores["mlp"])})
    md = ("### UrbanMoE vs MLPs and Ridge (`modalities` embedding, same joint folds): R² per task\n\n"
          f"{_md(table)}\n{_md(pd.DataFrame(verdicts)) if verdicts else ''}")
    for name, info in utilisation.items():
        md += (f"\nExpert utilisation, {name} (moe fit on fold 0's training regions, shares of its test regions "
               f"routed to each expert; {info['epochs']} epochs):\n\n{_md(pd.DataFrame(info['table']))}")
        if "weights" in info:
            weights = _md(pd.DataFrame(info["weights"]))
            md += f"\nMean gate weight per expert, {name} (same fit and regions):\n\n{weights}"
    _write("moe", {"rows": rows, "utilisation": utilisation}, md)
    if utilisation:
        _plot_utilisation(utilisation)


def _plot_utilisation(utilisation: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(utilisation), figsize=(4.8 * len(utilisation), 3.2), squeeze=False,
                             gridspec_kw={"wspace": 0.55})
    for ax, (name, info) in zip(axes[0], utilisation.items(), strict=True):
        table = pd.DataFrame(info.get("weights", info["table"])).set_index("task").drop(columns="mean_active")
        image = ax.imshow(table.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, fontsize=7)
        ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="mean gate weight (share routed where not measured)")
    fig.savefig(RESULTS / "heads_moe_utilisation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser_ = parser(__doc__, raw_doc=True, parts="smollm2,prompt,moe", seeds="0,1,2,3,4",
                     seeds_help="seeds of the prompt part and of NYC/Chicago in moe")
    parser_.add_argument("--cityview-seeds", default="0", help="seeds of the CityView cities in the moe part")
    parser_.add_argument("--heads", default=",".join(PROMPT_HEADS), help="heads of the prompt part")
    parser_.add_argument("--method", default="pca", help="embedder of the prompt part")
    parser_.add_argument("--smollm2-regions", type=int, default=77, help="regions of the smollm2 timing")
    parser_.add_argument("--datasets", default="hafusion-chicago,hafusion-nyc,cityview-beijing,cityview-guangzhou")
    parser_.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 for the smollm2 timing)")
    args = parser_.parse_args()
    set_threads(args.threads)
    seeds = parse_seeds(args.seeds)
    for part in args.parts.split(","):
        if part == "smollm2":
            part_smollm2(args.smollm2_regions)
        elif part == "prompt":
            part_prompt(seeds, args.heads.split(","), args.method)
        elif part == "moe":
            part_moe(seeds, [int(s) for s in args.cityview_seeds.split(",")], args.datasets.split(","))
        else:
            raise SystemExit(f"unknown part {part!r}; valid: smollm2, prompt, moe")


if __name__ == "__main__":
    main()
