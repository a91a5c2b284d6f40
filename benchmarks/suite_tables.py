"""Suite tables from the rows of a `urbanprofile benchmark --suite ... --json` run: aggregates, per-pair R², the goal.

Reads the JSON lines the CLI printed, or its store (result rows; its own aggregate lines are recomputed here per
group of datasets, since the aggregate compares methods only over pairs every one of them ran on) and writes
``benchmarks/results/<stem>.md`` and ``<stem>.json``:

- per group of datasets and protocol: mean R², mean rank with its bootstrap interval, wins against the best
  ``raw-*`` baseline (``urbanprofile.evaluation.suites.suite_aggregate``), over the methods that ran on every pair
  of the group (the others are named);
- per pair, mean R² over seeds (± sd over seeds where there are several);
- the issue's goal: the best learned method's mean R² against the best baseline's (raw, ``pca``, ``autoencoder``,
  ``knn-location``, srai's embedders, caption TF-IDF), and whether it ranks first on mean rank.

    python benchmarks/suite_tables.py --rows run.jsonl (or --store run.duckdb --methods ... --seeds ...) \\
        --stem suite_socioeconomic --title "..." --command "urbanprofile benchmark ..." --wall 1234 \\
        --group hafusion-nyc [--log run.log]

Nothing is run here: every figure comes from the rows file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from common import RESULTS, environment, md_table, parse_seeds, parser, write_results

from urbanprofile.evaluation.suites import suite_aggregate, wins_text

#: Methods that count as baselines for the goal (the issue's list); every other method counts as learned.
BASELINE_PREFIXES = ("raw-",)
BASELINES = frozenset({"pca", "autoencoder", "knn-location", "srai-count", "srai-contextual-count", "hex2vec",
                       "geovex", "tfidf-captions", "concat"})
GOAL_MARGIN = 0.05


def is_baseline(method: str) -> bool:
    return method.startswith(BASELINE_PREFIXES) or method in BASELINES


#: What the results file keeps of each row.
ROW_FIELDS = ("dataset", "task", "method", "head", "protocol", "seed", "n_regions", "r2", "mae", "rmse",
              "worst_block_r2", "r2_gap", "morans_i", "embed_seconds", "head_seconds", "code_version")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Result rows of a ``--json`` run (lines with an R² and no ``row`` kind; failed rows kept out)."""
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "row" in row or "r2" not in row or row.get("status") == "failed":
            continue
        rows.append(row)
    return rows


def store_rows(path: Path, datasets: list[str], methods: list[str] | None, seeds: list[int] | None
               ) -> list[dict[str, Any]]:
    """Result rows of a DuckDB store (read-only), for the given datasets, methods and seeds (failed rows kept out)."""
    from urbanprofile.benchmark.store import ResultStore

    store = ResultStore(path, read_only=True)
    try:
        where: dict[str, Any] = {"dataset": datasets, **({"method": methods} if methods else {}),
                                 **({"seed": seeds} if seeds else {})}
        rows = store.rows(where)
    finally:
        store.close()
    return [r for r in rows if r.get("status") != "failed" and r.get("r2") is not None]


def group_aggregate(rows: list[dict[str, Any]], datasets: list[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The aggregate over a group's pairs, per protocol, keeping only methods that ran on all of them."""
    part = [r for r in rows if r["dataset"] in datasets]
    boards = []
    dropped: dict[str, list[str]] = {}
    for protocol in dict.fromkeys(r["protocol"] for r in part):
        prow = [r for r in part if r["protocol"] == protocol]
        pairs = {(r["dataset"], r["task"]) for r in prow}
        covered: dict[str, set[tuple[str, str]]] = {}
        for r in prow:
            covered.setdefault(r["method"], set()).add((r["dataset"], r["task"]))
        keep = {m for m, p in covered.items() if p == pairs}
        dropped[protocol] = sorted(set(covered) - keep)
        board = suite_aggregate([r for r in prow if r["method"] in keep])
        if not board.empty:
            boards.append(board)
    return (pd.concat(boards, ignore_index=True) if boards else pd.DataFrame()), dropped


def goal(board: pd.DataFrame) -> dict[str, Any]:
    """Best learned against best baseline by mean R², and who ranks first, in one protocol's aggregate."""
    learned = board[~board["method"].map(is_baseline)]
    base = board[board["method"].map(is_baseline)]
    if learned.empty or base.empty:
        return {}
    best_l = learned.sort_values("mean_r2").iloc[-1]
    best_b = base.sort_values("mean_r2").iloc[-1]
    first = board.sort_values(["mean_rank", "mean_r2"], ascending=[True, False]).iloc[0]
    margin = float(best_l["mean_r2"] - best_b["mean_r2"])
    return {"best_learned": best_l["method"], "best_learned_r2": float(best_l["mean_r2"]),
            "best_baseline": best_b["method"], "best_baseline_r2": float(best_b["mean_r2"]), "margin": margin,
            "first_on_rank": first["method"], "first_is_learned": not is_baseline(str(first["method"])),
            "met": bool(margin >= GOAL_MARGIN and not is_baseline(str(first["method"])))}


def aggregate_md(board: pd.DataFrame) -> str:
    body = [[r["method"], r["head"], r["mean_r2"], f"{r['mean_rank']:.2f} [{r['rank_low']:.2f}, {r['rank_high']:.2f}]",
             wins_text(r)] for r in board.to_dict("records")]
    return md_table(["method", "head", "mean R²", "mean rank [95% CI]", "wins vs best raw"], body)


def pairs_md(rows: list[dict[str, Any]], datasets: list[str], protocol: str) -> str:
    frame = pd.DataFrame([r for r in rows if r["dataset"] in datasets and r["protocol"] == protocol])
    if frame.empty:
        return ""
    stats = frame.groupby(["dataset", "task", "method"])["r2"].agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [f"{m:.3f}" + (f" ± {s:.3f}" if c > 1 else "") for m, s, c in
                     zip(stats["mean"], stats["std"], stats["count"], strict=True)]
    several = len(datasets) > 1
    stats["pair"] = [f"{d} {t}" if several else t for d, t in zip(stats["dataset"], stats["task"], strict=True)]
    table = stats.pivot(index="method", columns="pair", values="cell").fillna("-")
    methods = sorted(table.index, key=lambda m: (not is_baseline(m), m))
    table = table.loc[methods]
    return md_table(["method", *table.columns], [[m, *table.loc[m].tolist()] for m in methods])


def seeds_line(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    seeds: dict[str, set[int]] = {}
    for r in rows:
        if r["dataset"] in datasets:
            seeds.setdefault(r["method"], set()).add(int(r["seed"]))
    counts: dict[int, list[str]] = {}
    for method, s in sorted(seeds.items()):
        counts.setdefault(len(s), []).append(method)
    return "; ".join(f"{n} seed{'s' if n > 1 else ''}: {', '.join(ms)}" for n, ms in sorted(counts.items()))


def skip_lines(log: Path | None) -> list[str]:
    if log is None or not log.exists():
        return []
    return sorted({line.strip() for line in log.read_text().splitlines() if "skip" in line.lower()})


def main() -> None:
    p = parser(__doc__, raw_doc=True)
    p.add_argument("--rows", type=Path, default=None, help="the JSON lines of a benchmark --json run")
    p.add_argument("--store", type=Path, default=None,
                   help="or the run's DuckDB store (every seed finished so far, when a run was stopped)")
    p.add_argument("--methods", default=None, help="with --store: the methods to read (comma-separated)")
    p.add_argument("--seeds", default=None, help="with --store: the seeds to read (comma-separated)")
    p.add_argument("--stem", required=True, help="results file stem under benchmarks/results")
    p.add_argument("--title", required=True)
    p.add_argument("--command", required=True, help="the command that made the rows (quoted in the results)")
    p.add_argument("--wall", type=float, default=None, help="wall seconds of the run")
    p.add_argument("--note", action="append", default=[], help="a line of context (repeatable)")
    p.add_argument("--group", action="append", required=True,
                   help="comma-separated datasets aggregated together (repeatable: one aggregate per group)")
    p.add_argument("--headline", action="append", default=[],
                   help="GROUP_INDEX=PROTOCOL: the protocol whose aggregate a group is read under (others shown)")
    p.add_argument("--log", type=Path, default=None, help="the run's stderr, for the pairs it skipped")
    args = p.parse_args()
    if (args.rows is None) == (args.store is None):
        raise SystemExit("error: give one of --rows FILE or --store FILE")
    datasets_all = [d for g in args.group for d in g.split(",")]
    rows = (read_rows(args.rows) if args.rows is not None else
            store_rows(args.store, datasets_all, args.methods.split(",") if args.methods else None,
                       parse_seeds(args.seeds) if args.seeds else None))
    headline = dict(h.split("=", 1) for h in args.headline)
    lines = [f"# {args.title}", "",
             "<!-- generated by benchmarks/suite_tables.py from the run's rows (its --json lines or its store) -->", "",
             f"`{args.command}`" + (f" ({args.wall:,.0f} s wall on the shared 2-core machine)" if args.wall else "")
             + ".", ""]
    lines += [*args.note, ""] if args.note else []
    payload: dict[str, Any] = {"command": args.command, "wall_seconds": args.wall, "notes": args.note, "groups": [],
                               "environment": environment()}
    for index, group in enumerate(args.group):
        datasets = group.split(",")
        board, dropped = group_aggregate(rows, datasets)
        n_pairs = len({(r["dataset"], r["task"]) for r in rows if r["dataset"] in datasets})
        read_under = headline.get(str(index))
        lines += [f"## {', '.join(datasets)}: {n_pairs} pairs", "", f"Seeds per method: {seeds_line(rows, datasets)}.",
                  ""]
        if read_under:
            lines += [f"These pairs are read under `{read_under}`; the other protocol is shown for reference.", ""]
        goals = {}
        for protocol in board["protocol"].unique() if not board.empty else []:
            part = board[board["protocol"] == protocol].reset_index(drop=True)
            g = goal(part)
            goals[protocol] = g
            lines += [f"**{protocol}**" + (" (read under this protocol)" if read_under == protocol else ""), "",
                      aggregate_md(part)]
            if dropped.get(protocol):
                lines += [f"Not in the aggregate (not run on every pair of the group): "
                          f"{', '.join(dropped[protocol])}.", ""]
            if g:
                lines += [f"Goal ({protocol}): best learned `{g['best_learned']}` {g['best_learned_r2']:.3f} against "
                          f"best baseline `{g['best_baseline']}` {g['best_baseline_r2']:.3f}: margin "
                          f"{g['margin']:+.3f} (goal +{GOAL_MARGIN:.2f}); first on mean rank: `{g['first_on_rank']}`"
                          f"; goal {'met' if g['met'] else 'not met'}.", ""]
        for protocol in dict.fromkeys(r["protocol"] for r in rows if r["dataset"] in datasets):
            lines += [f"Per pair, {protocol} (R², mean ± sd over seeds):", "", pairs_md(rows, datasets, protocol)]
        payload["groups"].append({"datasets": datasets, "n_pairs": n_pairs, "read_under": read_under,
                                  "aggregate": board.to_dict("records"), "dropped": dropped, "goal": goals})
    skips = skip_lines(args.log)
    if skips:
        lines += ["Skipped by the run:", "", *[f"- {s}" for s in skips], ""]
    payload["skipped"] = skips
    # The figures of each row, not the store's bookkeeping (per-module code hashes, fingerprints, chosen settings):
    # the tables above are made from these fields only.
    payload["rows"] = [{k: r.get(k) for k in ROW_FIELDS} for r in rows]
    write_results(RESULTS, args.stem, payload, "\n".join(lines), default=str)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
