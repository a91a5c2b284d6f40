"""Markdown leaderboards with the peers' published figures beside ours."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from urbanprofile.benchmark.runner import format_mean_std, leaderboard

#: Published R^2 under the peers' protocol (data README): raw-POI Ridge, HAFusion (ICDE 2024), ToPT (Chicago).
PUBLISHED_R2: dict[tuple[str, str], dict[str, float]] = {
    ("hafusion-nyc", "checkin"): {"raw POI (Ridge)": 0.764, "HAFusion": 0.844},
    ("hafusion-nyc", "crime"): {"HAFusion": 0.734},
    ("hafusion-nyc", "service_calls"): {"HAFusion": 0.493},
    ("hafusion-chicago", "checkin"): {"raw POI (Ridge)": 0.915, "HAFusion": 0.870, "ToPT": 0.986},
    ("hafusion-chicago", "crime"): {"HAFusion": 0.631, "ToPT": 0.874},
    ("hafusion-chicago", "service_calls"): {"HAFusion": 0.613, "ToPT": 0.874},
}


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_leaderboard(rows: list[dict[str, Any]]) -> str:
    """One Markdown table per (dataset, task): every method under every protocol, with bias columns."""
    board = leaderboard(rows)
    if board.empty:
        return "_no results_\n"
    parts = []
    for (dataset, task), group in board.groupby(["dataset", "task"], sort=True):
        published = PUBLISHED_R2.get((str(dataset), str(task)))
        head = f"#### {dataset} · {task} (n = {int(group['n_regions'].iloc[0])})"
        if published:
            figures = ", ".join(f"{k} {v:.3f}" for k, v in published.items())
            head += f"\n\nPublished R² (peers' `paper` protocol, some with test-fold epoch selection): {figures}"
        lines = [
            head,
            "",
            "| protocol | method | R² | MAE | RMSE | worst-block R² | R² gap | Moran's I (resid.) | fit s | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in group.to_dict("records"):
            protocol = "paper (peers', comparison only)" if r["protocol"] == "paper" else r["protocol"]
            lines.append(
                f"| {protocol} | {r['method']} | {format_mean_std(r['r2_mean'], r['r2_std'])} "
                f"| {format_mean_std(r['mae_mean'], r['mae_std'], 2)} "
                f"| {format_mean_std(r['rmse_mean'], r['rmse_std'], 2)} "
                f"| {_num(r['worst_block_r2_mean'])} | {_num(r['r2_gap_mean'])} | {_num(r['morans_i_mean'])} "
                f"| {_num(r['fit_seconds_mean'], 2)} | {int(r['n_seeds'])} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def best_by_protocol(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The best method (mean R^2) per dataset, task and protocol."""
    board = leaderboard(rows)
    if board.empty:
        return board
    idx = board.groupby(["dataset", "task", "protocol"])["r2_mean"].idxmax()
    return board.loc[idx, ["dataset", "task", "protocol", "method", "r2_mean", "r2_std"]].reset_index(drop=True)


def markdown_summary(rows: list[dict[str, Any]], bias_protocol: str = "spatial") -> str:
    """One compact table: R² of every method under every protocol per (dataset, task), published figures
    beside them, and the bias columns (worst-block R², Moran's I of residuals) under ``bias_protocol``."""
    board = leaderboard(rows)
    if board.empty:
        return "_no results_\n"
    protocols = [p for p in ("paper", "nested", "spatial") if p in set(board["protocol"])]
    header = ["dataset", "task", "method", *[f"R² {p}" for p in protocols],
              f"worst-block R² ({bias_protocol})", f"Moran's I ({bias_protocol})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, task), group in board.groupby(["dataset", "task"], sort=True):
        for label, value in (PUBLISHED_R2.get((str(dataset), str(task))) or {}).items():
            cells = [f"*{value:.3f}*" if p == "paper" else "" for p in protocols]
            lines.append(f"| {dataset} | {task} | *published: {label}* | " + " | ".join(cells) + " | | |")
        by_method = group.set_index(["method", "protocol"])
        methods = list(dict.fromkeys(group.sort_values("r2_mean", ascending=False)["method"]))
        if "nested" in protocols:  # order by the leak-free protocol
            nested = group[group["protocol"] == "nested"].sort_values("r2_mean", ascending=False)["method"]
            methods = list(dict.fromkeys([*nested, *methods]))
        for method in methods:
            cells = []
            for p in protocols:
                key = (method, p)
                cells.append(format_mean_std(by_method.loc[key, "r2_mean"], by_method.loc[key, "r2_std"])
                             if key in by_method.index else "-")
            bias = (method, bias_protocol)
            worst = _num(by_method.loc[bias, "worst_block_r2_mean"]) if bias in by_method.index else "-"
            moran = _num(by_method.loc[bias, "morans_i_mean"]) if bias in by_method.index else "-"
            lines.append(f"| {dataset} | {task} | {method} | " + " | ".join(cells) + f" | {worst} | {moran} |")
    return "\n".join(lines) + "\n"
