"""Urban-R1 figures: a complete GRPO run of SmolLM2-135M on NYC + Chicago on the CPU, against its baselines.

Run:  .venv/bin/python benchmarks/r1.py [--steps 40] [--task crime] [--threads 1] [--device cuda --name r1_gpu]
Writes benchmarks/results/r1.json, r1.md and r1_reward_curve.png (the run folder goes to results/r1-run).
One task, one held-out fold set (fold 0 of the spatial protocol in each city), one seed. The machine is
shared: the load average and the CPU share this process got are recorded beside every time.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from common import RESULTS, parser, set_threads, write_json, write_text


def _phase(name: str, fn: Any, record: dict[str, Any]) -> Any:
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record[name] = {"wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / wall if wall else float("nan"),
                    "load_avg_1min": [load_before, os.getloadavg()[0]],
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available():
        record[name]["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"{name}: {wall:.0f} s wall, {cpu:.0f} s CPU, load {load_before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return out


def main() -> None:
    parser_ = parser(__doc__, raw_doc=True)
    parser_.add_argument("--steps", type=int, default=40)
    parser_.add_argument("--lr", type=float, default=5e-4)
    parser_.add_argument("--generations", type=int, default=4)
    parser_.add_argument("--task", default="crime")
    parser_.add_argument("--threads", type=int, default=1)
    parser_.add_argument("--model", default="smollm2")
    parser_.add_argument("--run-dir", default="results/r1-run")
    parser_.add_argument("--sft-lr", type=float, default=None, help="SFT learning rate (default: --lr)")
    parser_.add_argument("--temperature", type=float, default=1.0)
    parser_.add_argument("--beta", type=float, default=0.04)
    parser_.add_argument("--device", default="cpu", help="cpu (the 2-core figure), cuda or auto")
    parser_.add_argument("--name", default="r1", help="results file stem: benchmarks/results/<name>.{json,md}")
    parser_.add_argument("--save-every", type=int, default=10)
    parser_.add_argument("--reward", default="debiased", help="debiased, distance or exact")
    parser_.add_argument("--scale-rewards", action="store_true",
                        help="advantages / group reward std (GRPO as published)")
    parser_.add_argument("--holdout-city", default=None, help="hold this dataset out whole (train on the other)")
    parser_.add_argument("--init", default="base", help="base, or sft (GRPO starts from the SFT model)")
    parser_.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight (0: none)")
    parser_.add_argument("--seed", type=int, default=0, help="random_state of the run (sampling, LoRA, batches)")
    parser_.add_argument("--constrain-answer", action="store_true",
                        help="draw the level digit among the valid levels only (no format failures)")
    args = parser_.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    set_threads(args.threads)
    import torch

    from urbanprofile.apps.r1.config import R1Config, load_cities, prepare_task
    from urbanprofile.apps.r1.evaluate import evaluate_run
    from urbanprofile.apps.r1.loop import train_grpo
    from urbanprofile.apps.r1.sft import train_sft

    config = R1Config(datasets=["hafusion-nyc", "hafusion-chicago"], task=args.task, model=args.model,
                      steps=args.steps, generations=args.generations, save_every=args.save_every,
                      learning_rate=args.lr, sft_learning_rate=args.sft_lr or args.lr, beta=args.beta,
                      temperature=args.temperature, device=args.device,
                      reward=args.reward, scale_rewards=args.scale_rewards,
                      holdout_city=args.holdout_city, init=args.init, entropy_coef=args.entropy_coef,
                      constrain_answer=args.constrain_answer, random_state=args.seed)
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    record: dict[str, Any] = {"config": config.to_json(), "threads": args.threads, "cpus": os.cpu_count(),
                              "device": torch.cuda.get_device_name() if args.device != "cpu" and
                              torch.cuda.is_available() else "cpu"}
    cities = load_cities(config)
    data = prepare_task(config, cities)
    if args.model == "smollm2":  # convert the packaged GGUF once (cached), outside the timed run
        from urbanprofile.encoders.llm import resolve_causal_lm

        _phase("model_conversion_or_cache", lambda: resolve_causal_lm("smollm2"), record)
    if config.init == "sft":  # GRPO starts from the SFT model, so SFT trains first
        sft = _phase("sft", lambda: train_sft(config, run_dir, data=data), record)
        grpo = _phase("grpo", lambda: train_grpo(config, run_dir, resume=False, data=data), record)
    else:
        grpo = _phase("grpo", lambda: train_grpo(config, run_dir, resume=False, data=data), record)
        sft = _phase("sft", lambda: train_sft(config, run_dir, data=data), record)
    metrics = _phase("evaluate", lambda: evaluate_run(run_dir, cities=cities), record)
    record.update({"grpo_summary": grpo, "sft_summary": sft, "metrics": metrics["methods"],
                   "n_test": metrics["n_test"], "groups": metrics["groups"]})
    write_json(RESULTS / f"{args.name}.json", record, default=float, indent=2)
    if (run_dir / "reward_curve.png").is_file():
        shutil.copy(run_dir / "reward_curve.png", RESULTS / f"{args.name}_reward_curve.png")
    write_text(RESULTS / f"{args.name}.md", markdown(record))
    print(markdown(record))


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(record: dict[str, Any]) -> str:
    g = record["grpo"]
    s = record["grpo_summary"]
    n_levels = record["config"]["n_levels"]
    reward = record["config"].get("reward", "distance")
    scaling = "scaled by the group reward std" if record["config"].get("scale_rewards", True) else "unscaled (r - mean)"
    holdout = record["config"].get("holdout_city")
    start = "SFT model (also its KL reference)" if record["config"].get("init") == "sft" else "base model"
    if record["config"].get("entropy_coef"):
        start += f", entropy bonus {record['config']['entropy_coef']:g}"
    if record["config"].get("constrain_answer"):
        start += ", answers constrained to the level digits (sampling, GRPO and greedy evaluation)"
    held_out = f"all of {holdout}, trained on the other city" if holdout else "fold 0 of spatial in each city"
    lines = [
        f"Device: {record.get('device', 'cpu')} ({record['threads']} torch CPU threads). "
        f"GRPO: {s['steps']} steps, {s['completions_per_step']} completions per step "
        f"({len(s['groups'])} groups x G={record['config']['generations']}), {g['wall_s'] / 60:.1f} min wall "
        f"({s['seconds_per_step']:.1f} s/step), {g['cpu_s'] / 60:.1f} min CPU (this process got "
        f"{g['cpu_share']:.0%} of a core; load average {g['load_avg_1min'][0]:.1f} -> {g['load_avg_1min'][1]:.1f} "
        f"on {record['cpus']} cores), peak RSS {g['peak_rss_mb']:.0f} MB. SFT: {record['sft']['wall_s'] / 60:.1f} "
        f"min; evaluation of all methods: {record['evaluate']['wall_s'] / 60:.1f} min.",
        f"GRPO starts from the {start}. "
        f"Accuracy reward: {reward}; advantages {scaling}. Mean reward (format + accuracy): first 10 steps "
        f"{_f(s.get('reward_first_steps'))}, last 10 steps {_f(s.get('reward_last_steps'))}. Sampled answers "
        f"(share), first 10 steps {s.get('answers_first_steps', '-')}, "
        f"last 10 steps {s.get('answers_last_steps', '-')}.",
        "",
        f"Total advantage each answer received: in the {s.get('prompts_with_a_format_failure', '-')} prompts where "
        f"a completion did not parse {s.get('advantage_with_a_format_failure', '-')}; in the others "
        f"{s.get('advantage_without', '-')}.",
        "",
        f"Held-out regions: {record['n_test']} ({held_out}), "
        f"task {record['config']['task']}, levels 0-{record['config']['n_levels'] - 1}.",
        "",
        "| method | Spearman | Spearman (mean level) | level MAE | level R² | parse failures | worst group | "
        "worst-group MAE | worst-group gap | disparity | answers " + "/".join(map(str, range(n_levels))) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in record["metrics"].items():
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} |" + " |" * 9)
            continue
        counts = m.get("answer_counts", {})
        lines.append(
            f"| {name} | {_f(m['spearman'])} | {_f(m.get('spearman_expected_level'))} | {_f(m['level_mae'])} | "
            f"{_f(m['level_r2'])} | "
            f"{m['parse_failure_rate']:.0%} | {m['worst_group']} | {_f(m['worst_group_mae'])} | "
            f"{_f(m['worst_group_gap'])} | {_f(m['disparity'])} | "
            + "/".join(str(counts.get(str(k), 0)) for k in range(n_levels)) + " |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
