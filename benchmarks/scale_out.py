"""Scale-out figures: the same benchmark grid serially, in 2 local worker processes, and on a local Ray instance.

Grid: NYC and Chicago (HAFusion data), the baselines (7 deterministic + the autoencoder over 5 seeds) and one
learned method (``hafusion`` at ``--epochs``, default 100, over 5 seeds), 3 tasks x 3 protocols. Each
executor runs into a fresh results store; rows must be identical (timings aside). Writes
``benchmarks/results/scale_out.{json,md}`` and the HTML report of the serial store under
``benchmarks/results/report/``.

    URBANPROFILE_DATA=../shared/data python benchmarks/scale_out.py [--epochs 100] [--executors serial,jobs2,ray]
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from common import RESULTS, parse_seeds, parser, set_threads, write_json, write_text

STORES = Path("results") / "scale_out"
BASELINES = ["raw-poi", "raw-landuse", "raw-mobility", "raw-all", "pca", "raw-location", "knn-location", "autoencoder"]
_VARYING = {"created_at", "embed_seconds", "head_seconds", "fit_seconds"}


def _comparable(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("dataset", "task", "method", "protocol", "seed")
    return sorted(tuple([*(r[k] for k in keys), *(str(v) for k, v in sorted(r.items()) if k not in _VARYING)])
                  for r in rows)


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # every executor: one thread per unit (6 helpers share 2 cores)
    import torch

    set_threads(1)
    from urbanprofile import __version__
    from urbanprofile.benchmark.executors import make_executor
    from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
    from urbanprofile.benchmark.store import ResultStore
    from urbanprofile.methods import get_method, register_method
    from urbanprofile.report.html import write_report

    parser_ = parser(__doc__, seeds="0,1,2,3,4")
    parser_.add_argument("--epochs", type=int, default=100, help="training epochs of the learned method")
    parser_.add_argument("--executors", default="serial,jobs2,ray")
    parser_.add_argument("--datasets", default="hafusion-nyc,hafusion-chicago")
    args = parser_.parse_args()
    learned = register_method(dataclasses.replace(get_method("hafusion"), name=f"hafusion-e{args.epochs}",
                                                  params={"epochs": args.epochs}), replace=True)
    plan = BenchmarkPlan(datasets=args.datasets.split(","), methods=[*BASELINES, learned.name],
                         protocols=["paper", "nested", "spatial"], seeds=parse_seeds(args.seeds))
    executors = {"serial": ("serial", None), "jobs2": ("processes", 2), "ray": ("ray", 2)}
    STORES.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    reference: list[tuple[Any, ...]] | None = None
    for label in args.executors.split(","):
        kind, jobs = executors[label]
        path = STORES / f"{label}.duckdb"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        with ResultStore(path) as store:
            outcome = run_benchmark(plan, store=store, progress=True, executor=make_executor(kind, jobs=jobs))
        wall = time.perf_counter() - start
        rows = outcome.rows
        embed = {(r["dataset"], r["method"], r["seed"]): r["embed_seconds"] for r in rows}
        work = sum(embed.values()) + sum(r["head_seconds"] for r in rows)
        workers = jobs or 1
        comparable = _comparable(rows)
        reference = reference or comparable
        runs[label] = {
            "executor": kind, "workers": workers, "units": outcome.n_units, "rows": len(rows),
            "failed": len(outcome.failed), "wall_s": round(wall, 1), "work_s": round(work, 1),
            "overhead_per_unit_s": round((workers * wall - work) / max(outcome.n_units, 1), 2),
            "identical_to_first": comparable == reference,
            "unit_s_median": round(float(sorted(embed.values())[len(embed) // 2]), 2),
        }
        print(label, runs[label], flush=True)
    if "serial" in runs:
        for run in runs.values():
            run["speedup_vs_serial"] = round(runs["serial"]["wall_s"] / run["wall_s"], 2)
        report = write_report(STORES / "serial.duckdb", RESULTS / "report", data_dir=None)
        print(f"report: {report.path} ({report.maps} maps)")
    # Sizes of what moves: a unit description out, its rows back, a city once per node.
    from urbanprofile.data.registry import get_entry

    sizes = {}
    for name in plan.datasets or []:
        city = get_entry(name).load()
        frames = [city.targets, *city.views.values(), city.regions.drop(columns="geometry")]
        size = sum(int(f.memory_usage(deep=True).sum()) for f in frames)
        sizes[f"city {name} (in memory; once per node)"] = size + int(city.regions.geometry.to_wkb().map(len).sum())
    with ResultStore(STORES / f"{next(iter(runs))}.duckdb", read_only=True) as store:
        rows = store.rows()
    per_row = [len(json.dumps(r, default=str)) for r in rows]
    sizes["one row (JSON)"] = int(sum(per_row) / len(per_row))
    from urbanprofile.benchmark.unit import Unit

    unit = Unit("hafusion-nyc", learned, 0, tuple((t, p) for t in ("checkin", "crime", "service_calls")
                                                  for p in ("paper", "nested", "spatial")))
    sizes["one unit description (JSON)"] = len(json.dumps(dataclasses.asdict(unit), default=str))
    environment = {"package_version": __version__, "python": platform.python_version(), "torch": torch.__version__,
                   "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()[0],
                   "note": "6 helpers shared these 2 cores during the run; wall times include that contention"}
    result = {"environment": environment, "epochs": args.epochs, "plan": dataclasses.asdict(plan), "runs": runs,
              "sizes_bytes": sizes}
    write_json(RESULTS / "scale_out.json", result, default=str, indent=2)
    lines = ["| executor | workers | units | rows | wall s | unit compute s | overhead s / unit | speedup | "
             "identical rows |", "|---|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        lines.append(f"| {label} | {run['workers']} | {run['units']} | {run['rows']} | {run['wall_s']} | "
                     f"{run['work_s']} | {run['overhead_per_unit_s']} | {run.get('speedup_vs_serial', '-')} | "
                     f"{'yes' if run['identical_to_first'] else 'NO'} |")
    lines += ["", "| what moves | bytes |", "|---|---|", *(f"| {k} | {v:,} |" for k, v in sizes.items())]
    write_text(RESULTS / "scale_out.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(STORES / "tmp", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
