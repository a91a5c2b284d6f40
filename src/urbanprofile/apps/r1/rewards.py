"""The rewards of a run: the accuracy reward, the ``reward_log.jsonl`` every completion's reward goes to, and
its summaries (reward curves, advantage by answer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from urbanprofile.apps.r1.config import R1Config
from urbanprofile.apps.r1.prompts import AccuracyReward, format_reward, parse_answer
from urbanprofile.apps.r1.task import R1Data

REWARD_LOG = "reward_log.jsonl"


def make_reward(config: R1Config, data: R1Data) -> AccuracyReward:
    """The run's accuracy reward, centred (``debiased``) on the training targets of each geographic group."""
    reference: dict[str, list[float]] = {}
    for example in data.split("train"):
        reference.setdefault(example.group, []).append(example.target)
    return AccuracyReward(config.reward, config.answer, config.n_levels,
                          {group: np.asarray(v) for group, v in reference.items()})


class RewardLog:
    """The two reward functions trl calls, recording each completion's reward by step and group."""

    def __init__(self, path: Path, reward: AccuracyReward, prefix: str = "") -> None:
        self.path = path
        self.reward = reward
        self.answer = reward.answer
        self.n_levels = reward.n_levels
        self.prefix = prefix

    def _parse(self, completions: list[Any]) -> list[Any]:
        return [parse_answer(self.prefix + _text(c), self.answer, self.n_levels) for c in completions]

    def functions(self) -> list[Callable[..., list[float]]]:
        def format_reward_fn(completions: list[Any], **kwargs: Any) -> list[float]:
            return [format_reward(p) for p in self._parse(completions)]

        def accuracy_reward_fn(
            completions: list[Any], target: list[float], group: list[str], **kwargs: Any
        ) -> list[float]:
            parsed = self._parse(completions)
            acc = [self.reward(p, t, g) for p, t, g in zip(parsed, target, group, strict=True)]
            state = kwargs.get("trainer_state")
            step = int(state.global_step) + 1 if state is not None else -1
            append_rewards(self.path, step, group, parsed, acc)
            return acc

        format_reward_fn.__name__ = "format"
        accuracy_reward_fn.__name__ = "accuracy"
        return [format_reward_fn, accuracy_reward_fn]


def append_rewards(path: Path, step: int, groups: list[str], parsed: list[Any], accuracy: list[float]) -> None:
    """Append one ``reward_log.jsonl`` record per completion (both engines write the same records)."""
    with path.open("a") as handle:
        for p, a, g in zip(parsed, accuracy, groups, strict=True):
            row = {"step": step, "group": g, "format": format_reward(p), "accuracy": a,
                   "parsed": p.value is not None, "value": p.value}
            handle.write(json.dumps(row) + "\n")


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def trim_reward_log(path: Path, after_step: int) -> None:
    """Drop records of steps after a checkpoint (they are redone when a killed run resumes)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def reward_summary(path: Path, last: int = 10, generations: int | None = None) -> dict[str, Any]:
    """Mean reward (format + accuracy) over the first and last ``last`` steps, overall and per group; with
    ``generations`` (the log holds each prompt's G completions in a row) also :func:`advantage_by_answer`."""

    if not path.is_file() or path.stat().st_size == 0:
        return {}
    log = pd.read_json(path, lines=True)
    advantages = advantage_by_answer(log, generations) if generations else {}
    log["reward"] = log["format"] + log["accuracy"]
    steps = np.sort(log["step"].unique())
    first, final = log[log["step"].isin(steps[:last])], log[log["step"].isin(steps[-last:])]
    return {
        "reward_first_steps": float(first["reward"].mean()),
        "reward_last_steps": float(final["reward"].mean()),
        "parsed_first_steps": float(first["parsed"].mean()),
        "parsed_last_steps": float(final["parsed"].mean()),
        "group_reward_last_steps": {str(k): float(v) for k, v in final.groupby("group")["reward"].mean().items()},
        **_answer_shares(first, final),
        **advantages,
    }


def advantage_by_answer(log: Any, generations: int) -> dict[str, Any]:
    """Total advantage (``r - mean`` within each prompt's G completions) that every answer received over the
    run, apart for the prompts where some completion did not parse and for the others.

    ``log`` is the reward log as a table; it must hold each prompt's G completions in a row (the ``prefix``
    engine's order). Where a
    completion fails to parse, its penalty lifts the advantage of every other completion of that prompt by
    the same amount, whatever level it gave; this shows how much of what each level was pushed by came from
    that, next to what the accuracy reward gave it.
    """

    if len(log) % generations or "value" not in log:
        return {}
    reward = (log["format"] + log["accuracy"]).to_numpy(float).reshape(-1, generations)
    advantage = (reward - reward.mean(axis=1, keepdims=True)).ravel()
    failed = np.repeat(~log["parsed"].to_numpy(bool).reshape(-1, generations).all(axis=1), generations)
    answer = log["value"].map(lambda v: "unparsed" if pd.isna(v) else f"{v:g}")
    out: dict[str, Any] = {}
    for name, rows in (("advantage_with_a_format_failure", failed), ("advantage_without", ~failed)):
        totals = pd.Series(advantage[rows]).groupby(answer[rows].to_numpy()).sum()
        out[name] = {str(k): round(float(v), 2) for k, v in totals.items()}
    out["prompts_with_a_format_failure"] = int(failed.sum() // generations)
    return out


def _answer_shares(first: Any, final: Any) -> dict[str, Any]:
    """How often each answer was sampled early and late (a policy collapsing onto one answer shows here)."""
    if "value" not in final:
        return {}
    shares = {}
    for name, rows in (("answers_first_steps", first), ("answers_last_steps", final)):
        counts = rows["value"].dropna().value_counts(normalize=True).sort_index()
        shares[name] = {f"{k:g}": round(float(v), 3) for k, v in counts.items()}
    return shares


def plot_reward_curves(run_dir: Path, window: int = 5) -> Path | None:
    """``reward_curve.png``: mean reward per step (rolling mean), overall and per group."""

    path = run_dir / REWARD_LOG
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = pd.read_json(path, lines=True)
    log["reward"] = log["format"] + log["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    overall = log.groupby("step")["reward"].mean().rolling(window, min_periods=1).mean()
    ax.plot(overall.index, overall.to_numpy(), color="black", lw=2, label="all groups")
    for group, rows in log.groupby("group"):
        curve = rows.groupby("step")["reward"].mean().rolling(window, min_periods=1).mean()
        ax.plot(curve.index, curve.to_numpy(), lw=1, label=str(group))
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"reward (format + accuracy), rolling mean of {window}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "reward_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
