"""Threads under load: a learned-method benchmark with one thread per process against the libraries' defaults.

Runs ``urbanprofile benchmark`` (each run in a fresh process and a fresh store: nothing is reused) on one
dataset for some learned methods, one seed, one protocol, in four conditions: ``--threads 1`` (the default
since the fix) and ``--threads 0`` (torch's and BLAS's defaults, one thread per core, as before the fix; the
thread environment variables are removed for it), each with no extra load and with ``--load N`` CPU-bound
processes (``while True: pass``) running beside it, killed afterwards. The two settings alternate within a
load level, so that each pair meets the shared machine at about the same time. The 1-minute load average is recorded
before each run: on a shared machine "no extra load" is not idle, and the table says so.

Prints a table and writes ``benchmarks/results/threads.{json,md}``.

    URBANPROFILE_DATA=../shared/data python benchmarks/threads.py [--methods hafusion,srel] [--load 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
#: The two settings compared: the fix (one thread per process) and the libraries' defaults.
SETTINGS = {"1 thread (fix)": 1, "library defaults": 0}


def load_average() -> float:
    return os.getloadavg()[0]


def start_load(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` CPU-bound processes, each one busy loop (the competing work of a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:  # only the processes this script started, by their handle
        process.kill()
    for process in processes:
        process.wait()


def _cpu_since(before: resource.struct_rusage) -> float:
    """CPU seconds of the children waited for since ``before`` (the benchmark process; the load processes are
    waited for only after it)."""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_once(args: argparse.Namespace, threads: int, store: Path) -> dict[str, Any]:
    """One ``benchmark`` run in a child process; its wall time, rows and exit status."""
    env = dict(os.environ)
    if threads == 0:  # as before the fix: nothing limits torch or BLAS
        for variable in THREAD_VARIABLES:
            env.pop(variable, None)
    command = [sys.executable, "-m", "urbanprofile.cli", "benchmark", "--datasets", args.dataset,
               "--methods", args.methods, "--protocols", args.protocol, "--seeds", str(args.seed),
               "--store", str(store), "--threads", str(threads), "--json"]
    if args.tasks:
        command += ["--tasks", args.tasks]
    start = time.perf_counter()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:  # run() has killed and waited for it: its CPU time until then is counted
        return {"wall_seconds": None, "cpu_seconds": _cpu_since(used), "timed_out": True, "rows": [],
                "returncode": None}
    wall = time.perf_counter() - start
    cpu = _cpu_since(used)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-2000:])
    return {"wall_seconds": wall, "cpu_seconds": cpu, "timed_out": False, "rows": rows,
            "returncode": done.returncode}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Wall time, per-method embedding seconds and the thread count recorded in the rows."""
    embed: dict[str, float] = {}
    threads = set()
    for row in result["rows"]:
        embed[row["method"]] = row.get("embed_seconds") or 0.0
        threads.add(row.get("threads"))
    return {"wall_seconds": result["wall_seconds"], "cpu_seconds": result["cpu_seconds"],
            "timed_out": result["timed_out"],
            "returncode": result["returncode"], "embed_seconds": embed, "threads_recorded": sorted(threads, key=str),
            "n_rows": len(result["rows"])}


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def markdown(payload: dict[str, Any]) -> str:
    methods = payload["methods"].split(",")
    lines = [
        f"# Threads under load: `benchmark` of {', '.join(methods)} on {payload['dataset']} "
        f"({payload['protocol']}, seed {payload['seed']})",
        "",
        f"Machine: {payload['cpus']} CPUs, shared with other users; `load before` is the 1-minute load average "
        f"just before the run (a load above 0 means the 'no extra load' runs were not on an idle machine). "
        f"'with load' adds {payload['load']} CPU-bound processes. Regenerate: `{payload['command']}`.",
        "",
        "| threads | extra load | load before | wall s | CPU s | " + " | ".join(f"{m} fit s" for m in methods)
        + " | threads recorded | under load / without |",
        "|---|---|---|---|---|" + "---|" * len(methods) + "---|---|",
    ]
    for run in payload["runs"]:
        ratio = run.get("ratio_to_no_load")
        cells = [run["setting"], str(run["extra_load"]), f"{run['load_before']:.2f}",
                 ("> " + str(payload["timeout"]) + " (stopped)") if run["timed_out"] else _fmt(run["wall_seconds"]),
                 _fmt(run.get("cpu_seconds")),
                 *(_fmt(run["embed_seconds"].get(m)) for m in methods),
                 ", ".join(map(str, run["threads_recorded"])) or "-",
                 "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="hafusion-chicago")
    parser.add_argument("--methods", default="hafusion,srel")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: all of the dataset's)")
    parser.add_argument("--protocol", default="nested")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", type=int, default=2, help="CPU-bound processes beside the loaded runs")
    parser.add_argument("--settings", default=",".join(str(v) for v in SETTINGS.values()),
                        help="thread settings to run: 1 (the fix), 0 (library defaults)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds before a run is stopped")
    parser.add_argument("--out", type=Path, default=RESULTS / "threads", help="output stem (.json and .md)")
    args = parser.parse_args()
    if args.load < 1:
        parser.error("--load must be at least 1")
    wanted = {int(s) for s in args.settings.split(",")}
    names = {v: k for k, v in SETTINGS.items()}
    runs: list[dict[str, Any]] = []
    base: dict[int, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="urbanprofile-threads-") as tmp:
        # Settings alternate within each load level, so that the two see the shared machine at about the same time.
        for extra in (0, args.load):
            for threads in [t for t in SETTINGS.values() if t in wanted]:
                before = load_average()
                load = start_load(extra)
                try:
                    result = run_once(args, threads, Path(tmp) / f"t{threads}-l{extra}.duckdb")
                finally:
                    stop_load(load)
                run = {"setting": names[threads], "threads": threads, "extra_load": extra, "load_before": before,
                       **summarise(result)}
                if extra == 0:
                    base[threads] = run["wall_seconds"]
                elif base.get(threads) and run["wall_seconds"]:
                    run["ratio_to_no_load"] = run["wall_seconds"] / base[threads]
                runs.append(run)
                print(f"{run['setting']:>18} load +{extra}: {_fmt(run['wall_seconds'])} s "
                      f"(load before {before:.2f}; fits {run['embed_seconds']})", flush=True)
                time.sleep(20)  # let the load average settle a little between runs
    payload = {
        "dataset": args.dataset, "methods": args.methods, "protocol": args.protocol, "seed": args.seed,
        "load": args.load, "timeout": args.timeout, "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "runs": runs,
        "command": "python benchmarks/threads.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(payload)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
