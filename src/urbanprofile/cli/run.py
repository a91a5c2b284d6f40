"""Commands that run methods: embed one dataset, evaluate one method, benchmark a grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

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
    writing,
)
from urbanprofile.errors import MethodUnavailableError, UrbanProfileError

if TYPE_CHECKING:
    from urbanprofile.report.terminal import FitTable

# The project's modules, urbanprofile.methods included, are imported inside each command, not here: the data,
# evaluation, benchmark and report modules pull pandas and scikit-learn (about 2 s measured with `python -X importtime`
# on this busy 2-core machine), and even urbanprofile.methods (importlib.metadata for its plug-ins) and
# urbanprofile.config (tomllib) added 0.18 s to `import urbanprofile.cli` (0.21 -> 0.39 s, best of 7) when hoisted,
# which --help, --version and a mistyped option must not pay.


def _seeds(value: str) -> list[int]:
    from urbanprofile.benchmark.runner import MAX_SEED

    items = [v.strip() for v in value.split(",")]
    # Every item must be a seed: "1,,2" is a typo, not seeds 1 and 2.
    if not all(v.isdigit() for v in items):
        raise UrbanProfileError(f"--seeds must be comma-separated whole numbers from 0 to {MAX_SEED}, got {value!r}")
    return _check_seeds([int(v) for v in items], "--seeds")


def _check_seeds(seeds: list[int], where: str) -> list[int]:
    from urbanprofile.benchmark.runner import MAX_SEED

    if not seeds:
        raise UrbanProfileError(f"{where}: give at least one seed")
    if min(seeds) < 0 or max(seeds) > MAX_SEED:
        bad = min(seeds) if min(seeds) < 0 else max(seeds)
        raise UrbanProfileError(f"{where}: {bad} is out of range (seeds go from 0 to {MAX_SEED})")
    return seeds


def _interrupted(stop: KeyboardInterrupt, store_path: Path | None) -> typer.Exit:
    """One line saying what a Ctrl-C kept, and exit code 130 (so that `benchmark && report` stops)."""
    outcome = getattr(stop, "outcome", None)  # None: interrupted before the first unit started
    rows = outcome.rows if outcome is not None else []
    planned = f" of {outcome.n_units}" if outcome is not None else ""
    units = len({(r["dataset"], r["method"], r["seed"]) for r in rows})
    if store_path is None:
        kept = f"nothing kept ({units}{planned} units had finished; give --store to keep them)"
    else:
        kept = (f"kept {units} finished units ({len(rows)} rows){planned} in {store_path}; "
                "run the same command to resume")
    sys.stderr.write(f"interrupted: {kept}\n")
    return typer.Exit(130)


# -- embed -------------------------------------------------------------------------------------------
def embed(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output .parquet or .csv file, or a folder (DIR/) of "
                                     "Parquet part files.")],
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method name (with --checkpoint: "
                                               "urbanfusion, or leave it out).", show_default=False)] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Embed with a pretrained urbanfusion checkpoint folder (urbanprofile pretrain --out), "
        "frozen, instead of fitting a method.", show_default=False)] = None,
    modalities: Annotated[str | None, typer.Option(
        "--modalities", help="Modalities used at inference, e.g. location,poi (urbanfusion, concat).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="random_state of the method.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    parents: Parents = False,
    threads: Threads = None,
    data_dir: DataDir = None,
    chunk_rows: Annotated[int | None, typer.Option(
        "--chunk-rows", help="Rows per part file (DIR/) or row group / CSV chunk (default: 250000 per part; a "
        "file whole up to 1M rows).", show_default=False)] = None,
) -> None:
    """Fit a method on a dataset (or read a pretrained checkpoint) and write one embedding row per region."""
    from urbanprofile.data.embedding_parts import check_embedding_target, write_embedding
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.embedders.base import ReportsEpochs
    from urbanprofile.methods import get_method, register_checkpoint, with_modalities

    if checkpoint is None and method is None:
        raise UrbanProfileError("give --method (or --checkpoint, a pretrained urbanfusion folder)")
    spec = register_checkpoint(checkpoint, method) if checkpoint is not None else get_method(str(method))
    if modalities is not None:
        spec = with_modalities(spec, split_list(modalities) or [])
    method = spec.name
    out_path, folder = check_embedding_target(out, chunk_rows)
    check_output(out_path, parents=parents, overwrite=overwrite, folder=folder)  # before a fit that may take minutes
    n_threads = set_threads(threads)
    city = load_dataset(name, data_dir)
    spec = spec.for_city(city)
    embedder = spec.build(random_state=seed)
    if isinstance(embedder, ReportsEpochs):  # a trained method: show its epochs
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(escape(f"training {method} on {name}")), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err) as bar:
            job = bar.add_task("train", total=None)
            embedder.on_epoch = lambda epoch, total: bar.update(job, completed=epoch, total=total)
            embedding = embedder.fit_transform(city)
    else:
        with err.status(escape(f"fitting {method} on {name}")):
            embedding = embedder.fit_transform(city)
    from urbanprofile.data.embeddings import DATASET_ATTR

    embedding.attrs[DATASET_ATTR] = city.name  # parquet keeps it: `evaluate --embedding` refuses another dataset
    with writing(out_path):
        _, pieces = write_embedding(embedding, out_path if not folder else out, chunk_rows=chunk_rows,
                                    overwrite=overwrite)
    err.print(f"wrote {embedding.shape[0]} regions x {embedding.shape[1]} dimensions to {out_path}"
              f"{f' in {pieces} part files' if folder else ''} (views: {', '.join(spec.all_views) or '-'}; "
              f"{n_threads} thread{'s' if n_threads != 1 else ''})")


# -- evaluate and benchmark --------------------------------------------------------------------------
def _print_rows_json(row: dict[str, Any]) -> None:
    from urbanprofile.benchmark.runner import row_to_json

    sys.stdout.write(json.dumps(row_to_json(row)) + "\n")
    sys.stdout.flush()


def _leaderboard_table(rows: list[dict[str, Any]], title: str) -> FitTable:
    from urbanprofile.benchmark.runner import format_mean_std, leaderboard
    from urbanprofile.report.terminal import Column, FitTable

    board = leaderboard(rows)
    # The names a row is known by come first and stay; figures that matter less go when the terminal is narrow.
    columns = [Column("dataset", to_title=True), Column("task", to_title=True), Column("protocol", to_title=True),
               Column("method", to_title=True), Column("head", priority=2, to_title=True),
               Column("n", "figure", priority=5, to_title=True, justify="right"),
               Column("R²", "figure", justify="right"), Column("MAE", "figure", priority=3, justify="right"),
               Column("RMSE", "figure", priority=6, justify="right"),
               Column("worst-block R²", "figure", priority=1, justify="right"),
               Column("Moran's I", "figure", priority=4, justify="right"),
               Column("fit s", "figure", priority=7, justify="right"),
               Column("seeds", "figure", priority=5, justify="right")]
    paper = "paper" in set(board.get("protocol", []))
    notes = ["paper†: the peers' protocol, for comparison with published figures only"] if paper else []
    table = FitTable(columns, title=title, notes=notes, group_by=["dataset", "task"], keep=1)
    for r in board.to_dict("records"):
        protocol = "paper†" if r["protocol"] == "paper" else r["protocol"]
        table.add_row(
            r["dataset"], r["task"], protocol, r["method"], r["head"], str(r["n_regions"]),
            format_mean_std(r["r2_mean"], r["r2_std"]), format_mean_std(r["mae_mean"], r["mae_std"], 1),
            format_mean_std(r["rmse_mean"], r["rmse_std"], 1), fmt(r["worst_block_r2_mean"]),
            fmt(r["morans_i_mean"]), fmt(r["fit_seconds_mean"], 2), str(r["n_seeds"]),
        )
    return table


def evaluate(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task (indicator) name, or 'all' (one row per task).")],
    method: Annotated[str | None, typer.Option("--method", "-m", help="Method name.", show_default=False)] = None,
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="paper, nested or spatial.")] = "nested",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2,3,4",
    head: Annotated[str | None, typer.Option(
        "--head", help=escape("Head: ridge, knn, mlp, mlp-multitask, moe, prompt4re-<model>[-notask], concat-<model> "
                              "(default: the method's own)."), show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per result.")] = False,
    modalities: Annotated[str | None, typer.Option(
        "--modalities", help="Modalities used at inference, e.g. location,text (urbanfusion, concat).")] = None,
    store_path: Annotated[Path | None, typer.Option(
        "--store", help="DuckDB results store: finished seeds are kept there and reused (default: none).",
        show_default=False)] = None,
    embedding: Annotated[Path | None, typer.Option(
        "--embedding", help="Evaluate an embedding made elsewhere (.parquet/.csv: region_id + numeric columns) "
        "as method file:<stem>, instead of --method.", show_default=False)] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        "--checkpoint", help="Evaluate a pretrained urbanfusion checkpoint folder, frozen, as method "
        "urbanfusion:ckpt-<content hash> (--method: urbanfusion or left out).", show_default=False)] = None,
    train_fraction: Annotated[float, typer.Option(
        "--train-fraction", help="Fit the probe on this share of each outer training fold (a seeded subset; "
        "test folds unchanged): a label-efficiency point. Not stored.")] = 1.0,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate one method (and head) on one task, or all tasks, under one protocol, over seeds."""
    import contextlib

    from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
    from urbanprofile.benchmark.store import open_store
    from urbanprofile.heads.registry import parse_head

    if head:
        parse_head(head)  # a typo fails before any data is read
    set_threads(threads)
    if checkpoint is not None:
        from urbanprofile.methods import register_checkpoint

        if embedding is not None:
            raise UrbanProfileError("give --embedding or --checkpoint, not both")
        method = register_checkpoint(checkpoint, method).name
    if (method is None) == (embedding is None):
        raise UrbanProfileError("give either --method or --embedding")
    if embedding is not None:
        from urbanprofile.methods import register_embedding

        method = register_embedding(embedding.stem, embedding).name
    assert method is not None
    if modalities is not None:
        from urbanprofile.methods import get_method, with_modalities

        method = with_modalities(get_method(method), split_list(modalities) or []).name
    from urbanprofile.evaluation.protocols import check_train_fraction

    check_train_fraction(train_fraction)
    if store_path is not None and train_fraction != 1:
        raise UrbanProfileError("--train-fraction below 1 is not kept in a results store: leave out --store")
    plan = BenchmarkPlan(datasets=[name], methods=[method], tasks=None if task == "all" else [task],
                         protocols=[protocol], seeds=_seeds(seeds), heads=[head] if head else None,
                         train_fraction=train_fraction)
    if store_path is not None:
        from urbanprofile.benchmark.runner import validate_plan

        validate_plan(plan, data_dir)  # a typo fails before the store is opened
    with open_store(store_path) if store_path is not None else contextlib.nullcontext() as store:
        try:
            outcome = run_benchmark(plan, data_dir, store=store, progress=not as_json,
                                    on_row=_print_rows_json if as_json else None)
        except KeyboardInterrupt as stop:  # BenchmarkInterrupted says what finished
            raise _interrupted(stop, store_path) from None
        rows = outcome.resumed_rows + outcome.rows
        if not rows and outcome.skipped:
            raise MethodUnavailableError(outcome.skipped[0])
    if outcome.failed and len(outcome.failed) == len(rows):
        raise UrbanProfileError(f"{method} on {name} failed: {outcome.failed[0]['error']}")
    for row in outcome.failed:
        err.print(f"failed: {row['task']} {row['protocol']} seed {row['seed']}: {row['error']}")
    for line in outcome.skipped:
        err.print(f"skipped: {line}")
    if not as_json and rows:
        share = f"; probe fit on {train_fraction:g} of each training fold" if train_fraction != 1 else ""
        out.print(_leaderboard_table(rows, f"mean ± std over seeds{share}"))
    from urbanprofile.evaluation.large import LARGE_EVALUATION, peak_rss_gb

    if any((r.get("n_regions") or 0) >= LARGE_EVALUATION for r in rows):
        err.print(f"peak memory {peak_rss_gb():.2f} GB")


def benchmark(
    datasets: Annotated[str | None, typer.Option("--datasets", help="Comma-separated datasets (default all).")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (default all).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated tasks (default all).")] = None,
    protocols: Annotated[str | None, opt("Comma-separated protocols (default: paper,nested,spatial).")] = None,
    seeds: Annotated[str | None, opt("Comma-separated seeds of stochastic methods (default: 0,1,2,3,4).")] = None,
    store_path: Annotated[Path | None, typer.Option(
        "--store", help="DuckDB results store (default: results/urbanprofile.duckdb).", show_default=False)] = None,
    parents: Annotated[bool, typer.Option("--parents", help="Create the store's missing parent folders (the "
                                          "default store's results/ folder is always created).")] = False,
    heads: Annotated[str | None, typer.Option(
        "--heads", help="Comma-separated heads (default: each method's own head).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per requested row on stdout (stored earlier or now: see 'resumed').")] = False,
    executor: Annotated[str | None, typer.Option(
        "--executor", help=escape("Where units run: serial (default), processes (see --jobs) or ray (pip install "
                                  "'urbanprofile[ray]')."), show_default=False)] = None,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", help="Local worker processes (or CPUs of a local Ray instance).", show_default=False)] = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="Ray cluster to join: auto or HOST:PORT (default: a local Ray instance).",
        show_default=False)] = None,
    retries: Annotated[int | None, opt("Retries of a unit whose worker died or raised (default: 2).")] = None,
    embeddings: Annotated[str | None, typer.Option(
        "--embeddings", help="Embeddings made elsewhere, NAME=FILE,... (.parquet/.csv with region_id), run as "
        "methods file:NAME beside --methods (alone when --methods is not given).", show_default=False)] = None,
    checkpoints: Annotated[str | None, typer.Option(
        "--checkpoints", help="Pretrained urbanfusion checkpoint folders, DIR,... (urbanprofile pretrain --out), "
        "run frozen as methods urbanfusion:ckpt-<content hash> beside --methods (alone when --methods is not "
        "given).", show_default=False)] = None,
    suite: Annotated[str | None, typer.Option(
        "--suite", help="Task suites instead of --tasks: core, socioeconomic, all (comma-separated); adds an "
        "aggregate per method over each suite.", show_default=False)] = None,
    config: ConfigFile = None,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Run a grid of datasets x methods x tasks x protocols x seeds x heads; rows of the same code are reused."""
    from urbanprofile.benchmark.executors import make_executor
    from urbanprofile.benchmark.runner import (
        DEFAULT_STORE,
        BenchmarkPlan,
        StudyConfig,
        describe_recomputed,
        run_benchmark,
        validate_plan,
    )
    from urbanprofile.benchmark.store import open_store

    study = configured(StudyConfig, config, dict(
        datasets=split_list(datasets), methods=split_list(methods), tasks=split_list(tasks),
        protocols=None if protocols is None else split_list(protocols) or [],
        seeds=None if seeds is None else _seeds(seeds), heads=split_list(heads),
        suite=None if suite is None else split_list(suite) or [""],  # --suite "" stays the error it was
        embeddings=embeddings, checkpoints=None if checkpoints is None else split_list(checkpoints) or [],
        store=store_path, executor=executor, jobs=jobs, address=address, retries=retries))
    _check_seeds(study.seeds, f"{config}: seeds" if config and seeds is None else "--seeds")
    method_names = study.methods
    if study.embeddings is not None:
        from urbanprofile.methods import register_embeddings

        method_names = [*(method_names or []), *register_embeddings(study.embeddings)]
    if study.checkpoints is not None:
        from urbanprofile.methods import register_checkpoints

        method_names = [*(method_names or []), *register_checkpoints(study.checkpoints)]
    plan = BenchmarkPlan(
        datasets=study.datasets, methods=method_names, tasks=study.tasks,
        protocols=study.protocols, seeds=study.seeds, heads=study.heads,
    )
    if study.retries < 0:
        raise UrbanProfileError(f"--retries must be at least 0, got {study.retries}")
    set_threads(threads)
    runner = make_executor(study.executor, jobs=study.jobs, address=study.address, retries=study.retries,
                           threads=threads)
    suites, suite_skipped = (_plan_suites(plan, ",".join(study.suite), data_dir) if study.suite is not None
                             else ([], []))
    validate_plan(plan, data_dir)
    store_path = study.store
    check_output(store_path, parents=parents or store_path == DEFAULT_STORE)
    with open_store(store_path) as store:  # a store file this command created goes again if nothing is written
        try:
            outcome = run_benchmark(plan, data_dir, store=store, progress=True,
                                    on_row=_print_rows_json if as_json else None, executor=runner)
        except KeyboardInterrupt as stop:  # BenchmarkInterrupted says what finished
            raise _interrupted(stop, store_path) from None
        if not outcome.rows and not outcome.n_resumed:
            reasons = "; ".join(outcome.skipped[:3]) + ("; ..." if len(outcome.skipped) > 3 else "")
            raise UrbanProfileError(f"nothing in the plan can run: {reasons or 'no (dataset, method) pair'}")
    for line in [*suite_skipped, *outcome.skipped]:
        err.print(f"skipped: {line}")
    if suite_skipped or outcome.skipped:
        for note in dict.fromkeys(n for s in suites for n in s.notes):
            err.print(f"note: {note}", markup=False)
    for line in describe_recomputed(outcome):
        err.print(f"recomputed: {line}")
    for row in outcome.failed:
        err.print(f"failed: {row['dataset']} {row['task']} {row['method']} {row['protocol']} seed {row['seed']}: "
                  f"{row['error']}")
    console = err if as_json else out
    rows = outcome.resumed_rows + outcome.rows
    if any(r.get("status") != "failed" for r in rows):
        console.print(_leaderboard_table(rows, "leaderboard (mean ± std over seeds)"))
    for chosen in suites:
        _print_suite_aggregate(rows, chosen, console, as_json)
    failed = f", {len(outcome.failed)} failed" if outcome.failed else ""
    console.print(
        f"{len(outcome.rows) - len(outcome.failed)} new results{failed}, {outcome.n_resumed} already in "
        f"{store_path}, {outcome.n_units} units on {runner.name}, {outcome.wall_seconds:.1f} s"
    )


def _plan_suites(plan: Any, names: str, data_dir: Path | None) -> tuple[list[Any], list[str]]:
    """Set the plan's datasets and tasks from suites; unknown suites and absent datasets become skip lines."""
    from urbanprofile.data.registry import list_datasets
    from urbanprofile.evaluation.suites import SUITES, get_suite, plan_suite

    if plan.tasks:
        raise UrbanProfileError("give --suite or --tasks, not both")
    suites, skipped = [], []
    for name in split_list(names) or []:
        if name in SUITES:
            suites.append(get_suite(name))
        else:
            skipped.append(f"suite {name!r}: unknown (valid: {', '.join(SUITES)})")
    if not suites:
        get_suite((split_list(names) or [""])[0])  # the one-line error, with a "did you mean"
    available = list_datasets(data_dir)
    pairs: dict[str, list[str]] = {}
    for chosen in suites:
        tasks, lines = plan_suite(chosen, available, plan.datasets)
        skipped += lines
        for dataset, names_ in tasks.items():
            pairs[dataset] = list(dict.fromkeys([*pairs.get(dataset, []), *names_]))
    if not pairs:
        raise UrbanProfileError(f"no dataset of suite {', '.join(s.name for s in suites)} is here: {skipped[0]}")
    plan.datasets, plan.dataset_tasks = list(pairs), pairs
    return suites, skipped


def _print_suite_aggregate(rows: list[dict[str, Any]], suite: Any, console: Console, as_json: bool) -> None:
    from urbanprofile.evaluation.suites import suite_aggregate, wins_text

    board = suite_aggregate(rows, suite)
    if board.empty:
        return
    from urbanprofile.report.terminal import Column, FitTable

    figure = {"kind": "figure", "justify": "right"}
    table = FitTable(
        [Column("protocol", to_title=True), Column("method"), Column("head", priority=2, to_title=True),
         Column("pairs run", priority=3, **figure), Column("common pairs", priority=4, **figure),  # type: ignore[arg-type]
         Column("mean R²", **figure), Column("mean rank [95% CI]", priority=1, **figure),  # type: ignore[arg-type]
         Column("wins vs best raw", priority=1, **figure)],  # type: ignore[arg-type]
        title=f"suite {suite.name} ({suite.n_pairs} pairs): over the pairs every method ran on, mean R², mean rank "
              "(bootstrap over pairs), wins against the best raw-* baseline, same folds")
    for r in board.to_dict("records"):
        protocol = "paper†" if r["protocol"] == "paper" else r["protocol"]
        table.add_row(protocol, r["method"], r["head"], str(r["n_pairs"]), str(r["n_common"]), fmt(r["mean_r2"]),
                      f"{r['mean_rank']:.2f} [{fmt(r['rank_low'], 2)}, {fmt(r['rank_high'], 2)}]",
                      wins_text(r))
        if as_json:
            _print_rows_json({"row": "suite-aggregate", "suite": suite.name, **{str(k): v for k, v in r.items()}})
    console.print(table)
    for caveat in suite.caveats:
        console.print(f"note: {caveat}", markup=False)
