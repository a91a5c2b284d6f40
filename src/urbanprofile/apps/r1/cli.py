"""The ``r1`` command group of Urban-R1: GRPO post-training and its evaluation (mounted by the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from urbanprofile.clikit import (
    ConfigFile,
    DataDir,
    Parents,
    Threads,
    check_output,
    configured,
    err,
    fmt,
    opt,
    out,
    set_threads,
    split_list,
)

if TYPE_CHECKING:
    from urbanprofile.apps.r1.config import R1Config

# R1's modules are imported inside each command, not here: they pull pandas and scikit-learn, and policy pulls
# torch (seconds, measured with `python -X importtime`), which `urbanprofile --help` must not pay.

# -- r1: GRPO post-training of a language-model region profiler ----------------------------------------
r1_app = typer.Typer(help="Urban-R1: GRPO post-training of a language-model region profiler.", no_args_is_help=True)


@r1_app.command("train")
def r1_train(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; resumed if it holds a run).")],
    datasets: Annotated[str | None, typer.Option("--datasets", "-d", help="Comma-separated datasets (one city each).",
                                                 show_default=False)] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Indicator asked about.", show_default=False)
                    ] = None,
    # Defaults live in R1Config (shown in its docs and in each run's config.json); None: not given.
    model: Annotated[str | None, opt("smollm2 (default), tiny-random or a causal-LM folder.")] = None,
    steps: Annotated[int | None, opt("GRPO steps (default: 60).")] = None,
    generations: Annotated[int | None, typer.Option("--generations", "-G", help="Completions per prompt "
                                                    "(default: 4).", show_default=False)] = None,
    max_new_tokens: Annotated[int | None, opt("Completion length limit (default: 4).")] = None,
    answer: Annotated[str | None, opt("level (default) or number.")] = None,
    n_levels: Annotated[int | None, typer.Option("--levels", help="Levels of the answer scale (default: 5).",
                                                 show_default=False)] = None,
    protocol: Annotated[str | None, typer.Option("--protocol", "-p", help="Whose folds hold regions out "
                                                 "(default: spatial).", show_default=False)] = None,
    fold: Annotated[int | None, opt("Held-out outer fold of each city (default: 0).")] = None,
    blocks_per_city: Annotated[int | None, opt("Geographic groups per city (default: 2).")] = None,
    holdout_city: Annotated[str | None, opt("Hold this dataset out whole (train on the others; --protocol and "
                                             "--fold then play no part).")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate (default: 5e-4).",
                                                        show_default=False)] = None,
    beta: Annotated[float | None, opt("KL penalty to the base model (default: 0.04).")] = None,
    lora_rank: Annotated[int | None, opt("LoRA rank (0: full fine-tuning; default: 16).")] = None,
    balanced: Annotated[bool | None, typer.Option("--balanced/--unbalanced", help="One prompt per group per step "
                                                  "(default: balanced).", show_default=False)] = None,
    save_every: Annotated[int | None, opt("Checkpoint every N steps (default: 10).")] = None,
    sft: Annotated[bool | None, typer.Option("--sft/--no-sft", help="Also train the SFT baseline (same budget; "
                                             "default: yes).", show_default=False)] = None,
    engine: Annotated[str | None, opt("prefix (prompt-sharing; default) or trl (GRPOTrainer).")] = None,
    lora_layers: Annotated[int | None, opt("LoRA on the last N layers (0: all; default: 4).")] = None,
    sft_learning_rate: Annotated[float | None, typer.Option(
        "--sft-lr", help="Learning rate of the SFT baseline (default: 5e-4).", show_default=False)] = None,
    temperature: Annotated[float | None, opt("Sampling temperature (default: 1.0).")] = None,
    reward: Annotated[str | None, opt("Accuracy reward: debiased (default; distance minus its mean over the "
                                       "city's training targets), distance or exact.")] = None,
    init: Annotated[str | None, opt("Where GRPO starts: base (default), or sft (the run's SFT model, trained "
                                     "first; also the KL reference).")] = None,
    scale_rewards: Annotated[bool | None, typer.Option(
        "--scale-rewards/--no-scale-rewards", show_default=False,
        help="Divide advantages by the group's reward spread (GRPO as published; default off: Dr. GRPO).")] = None,
    entropy_coef: Annotated[float | None, opt("Weight of an entropy bonus on the completion tokens (0: none; "
                                               "default: 0).")] = None,
    constrain_answer: Annotated[bool | None, typer.Option(
        "--constrain-answer/--free-answer", show_default=False,
        help="Draw the level digit among the valid levels only (sampling, GRPO and evaluation; default: free).")
                                ] = None,
    threads: Threads = None,
    device: Annotated[str | None, opt("auto (default; a GPU when one is visible), cpu or cuda.")] = None,
    seed: Annotated[int | None, opt("Random seed (default: 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from the last checkpoint.")] = True,
    parents: Parents = False,
    config_file: ConfigFile = None,
    data_dir: DataDir = None,
) -> None:
    """Post-train with GRPO (and the SFT baseline) on the training regions; writes the run folder.

    A --config file's keys are the fields of R1Config (datasets, task, steps, learning_rate, random_state, ...).
    """
    import shutil

    from urbanprofile.apps.r1.config import R1Config, has_run_state
    from urbanprofile.apps.r1.policy import check_model_path

    config: R1Config = configured(R1Config, config_file, dict(
        datasets=split_list(datasets), task=task, model=model, answer=answer, n_levels=n_levels, protocol=protocol,
        fold=fold, blocks_per_city=blocks_per_city, holdout_city=holdout_city, steps=steps, generations=generations,
        max_new_tokens=max_new_tokens, learning_rate=learning_rate, beta=beta, lora_rank=lora_rank,
        balanced=balanced, save_every=save_every, sft=sft, engine=engine, lora_layers=lora_layers, random_state=seed,
        sft_learning_rate=sft_learning_rate, temperature=temperature, reward=reward,
        scale_rewards=scale_rewards, init=init, entropy_coef=entropy_coef, constrain_answer=constrain_answer,
        data_dir=str(data_dir) if data_dir else None, device=device,
    ), flag_names={"random_state": "--seed", "learning_rate": "--lr", "n_levels": "--levels",
                   "sft_learning_rate": "--sft-lr"})
    from urbanprofile.apps.r1.policy import resolve_device

    resolve_device(config.device)  # an unknown device or a missing GPU stops here, before any data is read
    set_threads(threads)
    check_model_path(config.model)
    check_output(out_dir, parents=parents, folder=True)
    created = not out_dir.exists()
    try:
        _r1_train(config, out_dir, sft=config.sft, init=config.init, resume=resume)
    except BaseException:
        # A run that failed before its first checkpoint leaves nothing to resume: remove the folder it made
        # (only when this command made it), so the corrected command starts clean.
        if created and out_dir.is_dir() and not has_run_state(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _r1_train(config: R1Config, out_dir: Path, *, sft: bool, init: str, resume: bool) -> None:
    from urbanprofile.apps.r1.config import prepare_task
    from urbanprofile.apps.r1.loop import train_grpo
    from urbanprofile.apps.r1.sft import train_sft

    data = prepare_task(config)
    err.print(f"{len(data.split('train'))} training and {len(data.split('test'))} held-out regions; "
              f"groups: {', '.join(data.groups)}")
    if sft and init == "sft":  # GRPO starts from the SFT model
        sft_summary = train_sft(config, out_dir, data=data)
        err.print(f"SFT: {sft_summary['steps']} steps, {sft_summary['seconds']:.0f} s")
    summary = train_grpo(config, out_dir, resume=resume, data=data)
    err.print(f"GRPO: {summary['steps']} steps, {summary['seconds_per_step']:.1f} s/step; "
              f"reward {summary.get('reward_first_steps', float('nan')):.3f} (first 10 steps) -> "
              f"{summary.get('reward_last_steps', float('nan')):.3f} (last 10)")
    if sft and init != "sft":
        sft_summary = train_sft(config, out_dir, data=data)
        err.print(f"SFT baseline: {sft_summary['steps']} steps, {sft_summary['seconds']:.0f} s")
    err.print(f"wrote {out_dir}")


@r1_app.command("evaluate")
def r1_evaluate(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `r1 train`.")],
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: zero-shot, grpo, sft, ridge, "
                                         "knn-location.")] = "zero-shot,grpo,sft,ridge,knn-location",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda (default: the run's).")] = None,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Score the trained policy and its baselines on the held-out regions (metrics.json, predictions.csv)."""
    from urbanprofile.apps.r1.config import load_cities, read_config
    from urbanprofile.apps.r1.evaluate import evaluate_run
    from urbanprofile.apps.r1.policy import resolve_device
    from urbanprofile.report.terminal import Column, FitTable

    set_threads(threads)
    config = read_config(run_dir)
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if device is not None:
        resolve_device(device)
    payload = evaluate_run(run_dir, split_list(methods), cities=load_cities(config), device=device)
    if as_json:
        out.print_json(json.dumps(payload, default=float))
        return
    table = FitTable([Column("method"), *(Column(h, "figure", priority=p, justify="right") for h, p in (
        ("Spearman", 0), ("Spearman (mean level)", 4), ("level MAE", 0), ("level R²", 1), ("parse failures", 2),
        ("worst group MAE", 3), ("worst-group gap", 2), ("disparity", 5)))],
        title=f"held-out regions ({payload['n_test']})")
    for name, m in payload["methods"].items():
        if "skipped" in m:
            err.print(f"{name}: skipped, {m['skipped']}")
            continue
        table.add_row(name, fmt(m["spearman"]), fmt(m.get("spearman_expected_level")), fmt(m["level_mae"]),
                      fmt(m["level_r2"]), f"{m['parse_failure_rate']:.0%}", fmt(m["worst_group_mae"]),
                      fmt(m["worst_group_gap"]), fmt(m["disparity"]))
    out.print(table)
    err.print(f"wrote {run_dir / 'metrics.json'}")
