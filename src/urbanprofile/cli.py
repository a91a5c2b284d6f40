"""Command-line interface: a thin shell over data, methods, evaluation and the benchmark."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from urbanprofile.errors import MethodUnavailableError, UrbanProfileError

if TYPE_CHECKING:
    from urbanprofile.apps.r1.train import R1Config
    from urbanprofile.report.terminal import FitTable

app = typer.Typer(
    help="urbanprofile: urban region profiling with leak-free evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="Datasets found in the data directory.", no_args_is_help=True)
methods_app = typer.Typer(help="Registered methods.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(methods_app, name="methods")

def _print_version(value: bool) -> None:
    if value:
        from urbanprofile import __version__

        typer.echo(f"urbanprofile {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    # Only here for --version; the app's help is the Typer's own.
    pass


def _console(stderr: bool = False) -> Console:
    """A console that wraps to the terminal, or never cuts a table when output goes to a pipe or file.

    Markup is off: what we print carries user text (paths, names, error messages such as
    ``pip install 'urbanprofile[ray]'``) whose brackets rich would otherwise take for styles and drop.
    """
    console = Console(stderr=stderr, markup=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=100_000, markup=False)


out = _console()
err = _console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $URBANPROFILE_DATA).", show_default=False),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads per process for torch and BLAS (default 1, fastest for these sizes "
                 "on a busy machine; 0: the libraries' defaults).", show_default=False),
]


def _threads(threads: int | None) -> int:
    from urbanprofile.threads import apply_threads

    return apply_threads(threads)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


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


def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text, show_default=False)


ConfigFile = Annotated[Path | None, typer.Option(
    "--config", help="TOML file whose keys are this command's settings; flags given override it.",
    show_default=False)]


def _configured(schema: type[Any], path: Path | None, flags: dict[str, Any],
                flag_names: dict[str, str] | None = None) -> Any:
    """The command's config dataclass: the flags given, else the ``--config`` file's keys, else its defaults."""
    from urbanprofile.config import load_config, make_config

    file_values = load_config(path, schema) if path is not None else {}
    return make_config(schema, file_values, flags, source=path, flag_names=flag_names)


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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


# -- output paths ------------------------------------------------------------------------------------
Parents = Annotated[bool, typer.Option("--parents", help="Create the output's missing parent folders.")]


def _check_output(path: Path, *, parents: bool, overwrite: bool | None = None, folder: bool = False) -> None:
    """Refuse an output location before any work is done: a missing parent folder (unless ``parents``), a
    file where a folder is wanted or the reverse, an existing file (when ``overwrite`` is False), or a
    place we may not write in. ``overwrite=None``: an existing file is replaced (regenerable figures)."""
    if folder and path.exists() and not path.is_dir():
        raise UrbanProfileError(f"{path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UrbanProfileError(f"{path}: is a folder; give a file name")
    if overwrite is False and path.exists():
        raise UrbanProfileError(f"{path}: already exists; pass --overwrite to replace it")
    parent = path if folder and path.is_dir() else path.parent
    if not parent.exists():
        if not parents:
            raise UrbanProfileError(f"{parent}: folder does not exist; create it or pass --parents")
        while not parent.exists():  # the folder that --parents would create its path in
            parent = parent.parent
    if not parent.is_dir():
        raise UrbanProfileError(f"{parent}: is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UrbanProfileError(f"{parent}: cannot write in this folder (permission denied)")


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only file system, permissions) into one ``error:`` line, and
    remove the folders this command created on the way to ``path`` (only those, and only if empty)."""
    created = []
    ancestor = path.parent
    while not ancestor.exists():
        created.append(ancestor)
        ancestor = ancestor.parent
    try:
        yield
    except BaseException as error:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError) and not isinstance(error, UrbanProfileError):
            raise UrbanProfileError(f"{path}: could not write ({error.strerror or error})") from None
        raise


# -- datasets ----------------------------------------------------------------------------------------
@datasets_app.command("list")
def datasets_list(data_dir: DataDir = None) -> None:
    """List the datasets discovered in the data directory (reads no arrays)."""
    from urbanprofile.data.registry import discover
    from urbanprofile.report.terminal import Column, FitTable

    entries = discover(data_dir)
    table = FitTable([Column("dataset"), Column("family", priority=2), Column("path", "text", priority=1),
                      Column("status", "text")])
    for name, entry in entries.items():
        status = "ok" if entry.complete else f"incomplete: missing {', '.join(entry.missing)}"
        table.add_row(name, entry.family, str(entry.path), status)
    out.print(table)


@datasets_app.command("info")
def datasets_info(
    name: Annotated[str, typer.Argument(help="Dataset name, e.g. hafusion-nyc.")],
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Regions, views, tasks and label statistics of one dataset."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.data.tasks import task_data
    from urbanprofile.report.terminal import Column, FitTable

    city = load_dataset(name, data_dir)
    summary = city.summary()
    summary["task_rows"] = {t: task_data(city, t).describe() for t in city.tasks}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(Text.assemble((city.name, "bold"), f": {city.meta.get('description', '')}"))
    out.print(f"source: {city.meta.get('source')}")
    out.print(f"locations: {city.meta.get('location_source')}")
    views = FitTable([Column("view"), Column("shape", "figure")])
    for view, shape in summary["views"].items():
        views.add_row(view, " x ".join(map(str, shape)))
    if views.rows:
        out.print(views)
    else:  # an empty table reads as a display fault
        out.print("views: none (methods built on views, such as raw-poi, do not apply)")
    if summary["modalities"]:  # image and text datasets have no numeric views, only these
        modalities = FitTable([Column("modality"), Column("items", "figure", justify="right"),
                               Column("regions with one", "figure", justify="right")])
        for modality, counts in summary["modalities"].items():
            modalities.add_row(modality, str(counts["items"]), str(counts["regions"]))
        out.print(modalities)
    labels = FitTable([Column("task"), *(Column(h, "figure", priority=p, justify="right") for h, p in (
        ("n", 0), ("missing", 2), ("zeros", 3), ("mean", 1), ("std", 1), ("min", 2), ("max", 2))),
        Column("used for evaluation", "text", priority=1)])
    for task, stats in summary["tasks"].items():
        labels.add_row(task, *(_fmt(stats[k], 1) for k in ("n", "missing", "zeros", "mean", "std", "min", "max")),
                       summary["task_rows"][task])
    out.print(labels)
    for note in city.meta.get("notes", []):
        out.print(f"note: {note}")


# -- methods -----------------------------------------------------------------------------------------
@methods_app.command("list")
def methods_list() -> None:
    """List registered methods and what they need."""
    from urbanprofile.methods import broken_plugins, get_method, list_methods
    from urbanprofile.report.terminal import Column, FitTable

    table = FitTable([Column("method"), Column("head", priority=2), Column("views", "text", priority=1),
                      Column("needs", "text", priority=2), Column("seeds", priority=3),
                      Column("description", "text")])
    for name in list_methods():
        spec = get_method(name)
        needs = ", ".join([*spec.requires_views, *(["locations"] if spec.needs_locations else [])])
        table.add_row(name, spec.head, spec.describe_views() or "-", needs or "-",
                      "several" if spec.stochastic else "one", spec.description)
    out.print(table)
    for plugin, reason in broken_plugins().items():  # the others still work; say which one does not
        err.print(f"warning: method plug-in {plugin!r} not loaded: {reason}", soft_wrap=True)


# -- embed -------------------------------------------------------------------------------------------
@app.command()
def embed(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method name.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet or .csv file.")],
    seed: Annotated[int, typer.Option("--seed", help="random_state of the method.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    parents: Parents = False,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Fit a method on a dataset and write one embedding row per region."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.methods import get_method

    spec = get_method(method)
    _check_output(out_path, parents=parents, overwrite=overwrite)  # before a fit that may take minutes
    suffix = out_path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UrbanProfileError(f"{out_path}: output must end in .parquet or .csv")
    n_threads = _threads(threads)
    city = load_dataset(name, data_dir)
    spec = spec.for_city(city)
    embedder = spec.build(random_state=seed)
    if hasattr(embedder, "on_epoch"):  # a trained method: show its epochs
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
    from urbanprofile.data.io import write_atomic

    embedding.attrs[DATASET_ATTR] = city.name  # parquet keeps it: `evaluate --embedding` refuses another dataset
    with _writing(out_path):
        write_atomic(out_path, embedding.to_parquet if suffix == ".parquet" else embedding.to_csv)
    err.print(f"wrote {embedding.shape[0]} regions x {embedding.shape[1]} dimensions to {out_path} "
              f"(views: {', '.join(spec.all_views) or '-'}; {n_threads} threads)")


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
            format_mean_std(r["rmse_mean"], r["rmse_std"], 1), _fmt(r["worst_block_r2_mean"]),
            _fmt(r["morans_i_mean"]), _fmt(r["fit_seconds_mean"], 2), str(r["n_seeds"]),
        )
    return table


@app.command()
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
    _threads(threads)
    if (method is None) == (embedding is None):
        raise UrbanProfileError("give either --method or --embedding")
    if embedding is not None:
        from urbanprofile.methods import register_embedding

        method = register_embedding(embedding.stem, embedding).name
    assert method is not None
    if modalities is not None:
        from urbanprofile.methods import get_method, with_modalities

        method = with_modalities(get_method(method), _split(modalities) or []).name
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


@app.command()
def benchmark(
    datasets: Annotated[str | None, typer.Option("--datasets", help="Comma-separated datasets (default all).")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (default all).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated tasks (default all).")] = None,
    protocols: Annotated[str | None, _opt("Comma-separated protocols (default: paper,nested,spatial).")] = None,
    seeds: Annotated[str | None, _opt("Comma-separated seeds of stochastic methods (default: 0,1,2,3,4).")] = None,
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
    retries: Annotated[int | None, _opt("Retries of a unit whose worker died or raised (default: 2).")] = None,
    embeddings: Annotated[str | None, typer.Option(
        "--embeddings", help="Embeddings made elsewhere, NAME=FILE,... (.parquet/.csv with region_id), run as "
        "methods file:NAME beside --methods (alone when --methods is not given).", show_default=False)] = None,
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

    study = _configured(StudyConfig, config, dict(
        datasets=_split(datasets), methods=_split(methods), tasks=_split(tasks),
        protocols=None if protocols is None else _split(protocols) or [],
        seeds=None if seeds is None else _seeds(seeds), heads=_split(heads),
        suite=None if suite is None else _split(suite) or [""],  # --suite "" stays the error it was
        embeddings=embeddings, store=store_path, executor=executor, jobs=jobs, address=address, retries=retries))
    _check_seeds(study.seeds, f"{config}: seeds" if config and seeds is None else "--seeds")
    method_names = study.methods
    if study.embeddings is not None:
        from urbanprofile.methods import register_embeddings

        method_names = [*(method_names or []), *register_embeddings(study.embeddings)]
    plan = BenchmarkPlan(
        datasets=study.datasets, methods=method_names, tasks=study.tasks,
        protocols=study.protocols, seeds=study.seeds, heads=study.heads,
    )
    if study.retries < 0:
        raise UrbanProfileError(f"--retries must be at least 0, got {study.retries}")
    _threads(threads)
    runner = make_executor(study.executor, jobs=study.jobs, address=study.address, retries=study.retries,
                           threads=threads)
    suites, suite_skipped = (_plan_suites(plan, ",".join(study.suite), data_dir) if study.suite is not None
                             else ([], []))
    validate_plan(plan, data_dir)
    store_path = study.store
    _check_output(store_path, parents=parents or store_path == DEFAULT_STORE)
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
    for name in _split(names) or []:
        if name in SUITES:
            suites.append(get_suite(name))
        else:
            skipped.append(f"suite {name!r}: unknown (valid: {', '.join(SUITES)})")
    if not suites:
        get_suite((_split(names) or [""])[0])  # the one-line error, with a "did you mean"
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
    from urbanprofile.evaluation.suites import suite_aggregate

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
        table.add_row(protocol, r["method"], r["head"], str(r["n_pairs"]), str(r["n_common"]), _fmt(r["mean_r2"]),
                      f"{r['mean_rank']:.2f} [{_fmt(r['rank_low'], 2)}, {_fmt(r['rank_high'], 2)}]",
                      f"{r['wins']}/{r['n_compared']}")
        if as_json:
            _print_rows_json({"row": "suite-aggregate", "suite": suite.name, **{str(k): v for k, v in r.items()}})
    console.print(table)
    for caveat in suite.caveats:
        console.print(f"note: {caveat}", markup=False)


@app.command()
def report(
    store_path: Annotated[Path, typer.Option("--store", help="DuckDB results store to report on.")] = Path(
        "results/urbanprofile.duckdb"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for index.html.")] = Path("report"),
    no_maps: Annotated[bool, typer.Option("--no-maps", help="Leave out the per-block maps (needs no data).")] = False,
    parents: Parents = False,
    data_dir: DataDir = None,
    model_dir: Annotated[Path | None, typer.Option("--model", help="A model folder from `fit`: write its prediction "
                                                   "page (model-<folder>.html) instead of the store's.")] = None,
    level: Annotated[float, typer.Option("--level", help="With --model: interval level, in (0, 1).")] = 0.9,
) -> None:
    """Write a static, self-contained HTML report of a results store (leaderboards, bias, seeds, maps)."""
    from urbanprofile.report.html import write_report

    _check_output(out_dir, parents=parents, folder=True)
    if model_dir is not None:
        _report_model(model_dir, out_dir, level, data_dir)
        return
    with err.status(escape(f"writing the report of {store_path}")), _writing(out_dir / "index.html"):
        written = write_report(store_path, out_dir, data_dir=data_dir, with_maps=not no_maps)
    for note in written.notes:
        err.print(f"note: {note}")
    err.print(f"wrote {written.path} ({written.n_rows} rows, {written.n_datasets} datasets, {written.maps} maps)")


def _report_model(model_dir: Path, out_dir: Path, level: float, data_dir: Path | None) -> None:
    from urbanprofile.predict.conformal import check_level
    from urbanprofile.predict.page import write_model_page

    check_level(level)
    with err.status(escape(f"writing the prediction page of {model_dir}")):
        page = write_model_page(model_dir, out_dir, data_dir=data_dir, level=level)
    for note in page.notes:
        err.print(f"note: {note}", markup=False)
    err.print(f"wrote {page.path} ({page.n_predicted} regions predicted, {page.n_flagged} flagged)")


# -- build and map -----------------------------------------------------------------------------------
@app.command()
def build(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create (e.g. DATA/built/<city>).")],
    city: Annotated[str | None, typer.Argument(help="Short lowercase city name; the dataset is built-<city> "
                                               "(or city in --config).", show_default=False)] = None,
    regions: Annotated[Path | None, typer.Option(help="Region polygons (GeoParquet, GeoJSON, GPKG, shapefile).",
                                                 show_default=False)] = None,
    region_id_column: Annotated[str | None, _opt("Field holding region ids (default region_id, else 0..N-1).")] = None,
    region_name_column: Annotated[str | None, _opt("Field holding region names (shown on maps).")] = None,
    boundary: Annotated[str | None, _opt("Boundary to cut into H3 cells: vector file, .osm.pbf, or W,S,E,N.")] = None,
    h3_res: Annotated[int | None, typer.Option("--h3-res", help="H3 resolution (0-15).", show_default=False)] = None,
    h3_centres_only: Annotated[bool | None, typer.Option(
        "--h3-centres-only", help="Keep only H3 cells whose centre is inside the boundary.", show_default=False)
                               ] = None,
    pois: Annotated[Path | None, _opt("POI points (vector file, CSV/Parquet with lon/lat, or .osm.pbf).")] = None,
    category_column: Annotated[str | None, _opt("POI category field (default: category).")] = None,
    categories: Annotated[str | None, _opt("Comma-separated categories, or a JSON list/mapping file.")] = None,
    lon_column: Annotated[str | None, _opt("Longitude column of CSV/Parquet tables (default: lon).")] = None,
    lat_column: Annotated[str | None, _opt("Latitude column of CSV/Parquet tables (default: lat).")] = None,
    landuse: Annotated[Path | None, _opt("Land-use polygons with a class field (or .osm.pbf).")] = None,
    landuse_class_column: Annotated[str | None, _opt("Land-use class field (default: class).")] = None,
    trips: Annotated[Path | None, _opt(
        "Trips (CSV/Parquet): origin,destination ids, or both ends' coordinates (o_lon..., pickup_/dropoff_ "
        "longitude/latitude, start_/end_ lat/lng, origin_/destination_ ...).")] = None,
    trip_columns: Annotated[str | None, _opt("2 id columns or 4 coordinate columns, comma-separated.")] = None,
    trip_time_column: Annotated[str | None, _opt("Departure time column (default: time, when present).")] = None,
    trip_weight: Annotated[str | None, typer.Option("--trip-weight", help=(
        "Column with the number of trips per row (default: one named trips, count, n, weight or flow; "
        "'none' or no such column: each row is one trip)."), show_default=False)] = None,
    time_patterns: Annotated[int | None, _opt("Time-of-day patterns the trips are split into (default: 4).")
                             ] = None,
    labels: Annotated[Path | None, _opt("Labels: CSV/Parquet keyed by region id, or points with values.")] = None,
    label_id_column: Annotated[str | None, _opt("Region-id column of the labels table (default: region_id).")
                               ] = None,
    label_columns: Annotated[str | None, _opt("Comma-separated label columns (of --labels, else of --regions).")
                             ] = None,
    label_agg: Annotated[str | None, _opt("Aggregation of point labels per region (default: mean).")] = None,
    crs: Annotated[str | None, _opt("CRS of inputs that declare none (and of CSV coordinates), e.g. EPSG:31983.")
                   ] = None,
    join_engine: Annotated[str | None, _opt("Spatial join: auto (default), geopandas or duckdb.")] = None,
    max_cells: Annotated[int | None, typer.Option(
        "--max-cells", help="Most H3 cells --boundary may be cut into (default: 200000).", show_default=False)
                         ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace an existing dataset folder (only one a build wrote, holding nothing else)."))] = False,
    parents: Annotated[bool, typer.Option("--parents", help="Create the output's missing parent folders.")] = False,
    config: ConfigFile = None,
) -> None:
    """Build a dataset folder from raw geodata files (regions or H3 cells, POIs, land use, trips, labels).

    A --config file's keys are the fields of BuildSpec (city, regions, h3_resolution, pois, ...).
    """
    import shlex

    from urbanprofile.data.build import BuildSpec, build_dataset
    from urbanprofile.report.terminal import Column, FitTable

    spec = _configured(BuildSpec, config, dict(
        city=city, regions=regions, region_id_column=region_id_column, region_name_column=region_name_column,
        boundary=boundary, h3_resolution=h3_res, h3_cover=None if h3_centres_only is None else not h3_centres_only,
        pois=pois, category_column=category_column,
        categories=categories if categories is None or categories.endswith(".json") else _split(categories),
        lon_column=lon_column, lat_column=lat_column, landuse=landuse, landuse_class_column=landuse_class_column,
        trips=trips, trip_columns=_split(trip_columns), trip_time_column=trip_time_column,
        trip_weight_column=trip_weight,
        n_time_patterns=time_patterns, labels=labels, label_id_column=label_id_column,
        label_columns=_split(label_columns), label_agg=label_agg, crs=crs, join_engine=join_engine,
        max_cells=max_cells,
    ), flag_names={"city": "CITY", "h3_resolution": "--h3-res", "n_time_patterns": "--time-patterns",
                   "trip_weight_column": "--trip-weight"})
    city = spec.city
    if not out_dir.exists():  # an existing folder is judged by the build (--overwrite, only a built dataset)
        _check_output(out_dir, parents=parents, folder=True)
    command = "urbanprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = build_dataset(spec, out_dir, overwrite=overwrite, progress=True, command=command, log=err.print)
    for line in report.warnings():
        err.print(f"warning: {line}")
    table = FitTable([Column("figure"), Column("value", "text")],
                     title=f"built-{city}: {report.region_kind} regions, {report.join_engine} join")
    rows = [
        ("regions", report.n_regions),
        ("POIs joined / read", f"{report.n_pois_joined} / {report.n_pois_read}" if spec.pois else "-"),
        ("POI categories", report.n_categories or "-"),
        ("land-use classes", report.n_landuse_classes or "-"),
        ("trips kept / read", f"{report.n_trips_kept} / {report.n_trips_read}" if spec.trips else "-"),
        *([(f"trips kept / read (by {report.trip_weight_column})",
            f"{report.trips_weighted_kept:g} / {report.trips_weighted_read:g}")] if report.trip_weight_column else []),
        ("trip columns", ", ".join(report.trip_columns) or "-"),
        ("tasks", ", ".join(report.tasks) or "-"),
        ("seconds", f"{report.seconds['total']:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    out.print(table)
    out.print(f"wrote {report.output}")


@app.command("map")
def map_command(
    name: Annotated[str, typer.Argument(help="Dataset name, or the path of a built dataset folder.")],
    layer: Annotated[str, typer.Option("--layer", "-l", help=escape(
        "view:<view>[:<column>], label:<task>, prediction:<task>, residual:<task> or bias:<task>."))],
    out_paths: Annotated[list[Path], typer.Option("--out", "-o", help="Output .png or .html (repeatable).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method for prediction/residual/bias layers.")
                      ] = "raw-poi",
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="Protocol for the model layers.")] = "nested",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the method and protocol.")] = 0,
    parents: Parents = False,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Draw a choropleth of a view, label, prediction, residual or per-block bias as PNG and/or HTML."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.report.maps import check_map_path, layer_values, write_map

    for path in out_paths:
        check_map_path(path)
        _check_output(path, parents=parents)
    _threads(threads)  # the model layers fit a method
    city = load_dataset(name, data_dir)
    with err.status(escape(f"mapping {layer} of {city.name}")):
        resolved = layer_values(city, layer, method=method, protocol=protocol, seed=seed)
        written = []
        for path in out_paths:
            with _writing(path):
                written.append(write_map(city, resolved, path))
    for path in written:
        err.print(f"wrote {path}")


# -- r1: GRPO post-training of a language-model region profiler ----------------------------------------
r1_app = typer.Typer(help="Urban-R1: GRPO post-training of a language-model region profiler.", no_args_is_help=True)
app.add_typer(r1_app, name="r1")


@r1_app.command("train")
def r1_train(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; resumed if it holds a run).")],
    datasets: Annotated[str | None, typer.Option("--datasets", "-d", help="Comma-separated datasets (one city each).",
                                                 show_default=False)] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Indicator asked about.", show_default=False)
                    ] = None,
    # Defaults live in R1Config (shown in its docs and in each run's config.json); None: not given.
    model: Annotated[str | None, _opt("smollm2 (default), tiny-random or a causal-LM folder.")] = None,
    steps: Annotated[int | None, _opt("GRPO steps (default: 60).")] = None,
    generations: Annotated[int | None, typer.Option("--generations", "-G", help="Completions per prompt "
                                                    "(default: 4).", show_default=False)] = None,
    max_new_tokens: Annotated[int | None, _opt("Completion length limit (default: 4).")] = None,
    answer: Annotated[str | None, _opt("level (default) or number.")] = None,
    n_levels: Annotated[int | None, typer.Option("--levels", help="Levels of the answer scale (default: 5).",
                                                 show_default=False)] = None,
    protocol: Annotated[str | None, typer.Option("--protocol", "-p", help="Whose folds hold regions out "
                                                 "(default: spatial).", show_default=False)] = None,
    fold: Annotated[int | None, _opt("Held-out outer fold of each city (default: 0).")] = None,
    blocks_per_city: Annotated[int | None, _opt("Geographic groups per city (default: 2).")] = None,
    holdout_city: Annotated[str | None, _opt("Hold this dataset out whole (train on the others; --protocol and "
                                             "--fold then play no part).")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate (default: 5e-4).",
                                                        show_default=False)] = None,
    beta: Annotated[float | None, _opt("KL penalty to the base model (default: 0.04).")] = None,
    lora_rank: Annotated[int | None, _opt("LoRA rank (0: full fine-tuning; default: 16).")] = None,
    balanced: Annotated[bool | None, typer.Option("--balanced/--unbalanced", help="One prompt per group per step "
                                                  "(default: balanced).", show_default=False)] = None,
    save_every: Annotated[int | None, _opt("Checkpoint every N steps (default: 10).")] = None,
    sft: Annotated[bool | None, typer.Option("--sft/--no-sft", help="Also train the SFT baseline (same budget; "
                                             "default: yes).", show_default=False)] = None,
    engine: Annotated[str | None, _opt("prefix (prompt-sharing; default) or trl (GRPOTrainer).")] = None,
    lora_layers: Annotated[int | None, _opt("LoRA on the last N layers (0: all; default: 4).")] = None,
    sft_learning_rate: Annotated[float | None, typer.Option(
        "--sft-lr", help="Learning rate of the SFT baseline (default: 5e-4).", show_default=False)] = None,
    temperature: Annotated[float | None, _opt("Sampling temperature (default: 1.0).")] = None,
    reward: Annotated[str | None, _opt("Accuracy reward: debiased (default; distance minus its mean over the "
                                       "city's training targets), distance or exact.")] = None,
    init: Annotated[str | None, _opt("Where GRPO starts: base (default), or sft (the run's SFT model, trained "
                                     "first; also the KL reference).")] = None,
    scale_rewards: Annotated[bool | None, typer.Option(
        "--scale-rewards/--no-scale-rewards", show_default=False,
        help="Divide advantages by the group's reward spread (GRPO as published; default off: Dr. GRPO).")] = None,
    entropy_coef: Annotated[float | None, _opt("Weight of an entropy bonus on the completion tokens (0: none; "
                                               "default: 0).")] = None,
    constrain_answer: Annotated[bool | None, typer.Option(
        "--constrain-answer/--free-answer", show_default=False,
        help="Draw the level digit among the valid levels only (sampling, GRPO and evaluation; default: free).")
                                ] = None,
    threads: Threads = None,
    device: Annotated[str | None, _opt("auto (default; a GPU when one is visible), cpu or cuda.")] = None,
    seed: Annotated[int | None, _opt("Random seed (default: 0).")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from the last checkpoint.")] = True,
    parents: Parents = False,
    config_file: ConfigFile = None,
    data_dir: DataDir = None,
) -> None:
    """Post-train with GRPO (and the SFT baseline) on the training regions; writes the run folder.

    A --config file's keys are the fields of R1Config (datasets, task, steps, learning_rate, random_state, ...).
    """
    import shutil

    from urbanprofile.apps.r1.policy import check_model_path
    from urbanprofile.apps.r1.train import R1Config, has_run_state

    config: R1Config = _configured(R1Config, config_file, dict(
        datasets=_split(datasets), task=task, model=model, answer=answer, n_levels=n_levels, protocol=protocol,
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
    _threads(threads)
    check_model_path(config.model)
    _check_output(out_dir, parents=parents, folder=True)
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
    from urbanprofile.apps.r1.train import prepare_task, train_grpo, train_sft

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
    from urbanprofile.apps.r1.evaluate import evaluate_run
    from urbanprofile.apps.r1.policy import resolve_device
    from urbanprofile.apps.r1.train import load_cities, read_config
    from urbanprofile.report.terminal import Column, FitTable

    _threads(threads)
    config = read_config(run_dir)
    if data_dir is not None:
        config.data_dir = str(data_dir)
    if device is not None:
        resolve_device(device)
    payload = evaluate_run(run_dir, _split(methods), cities=load_cities(config), device=device)
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
        table.add_row(name, _fmt(m["spearman"]), _fmt(m.get("spearman_expected_level")), _fmt(m["level_mae"]),
                      _fmt(m["level_r2"]), f"{m['parse_failure_rate']:.0%}", _fmt(m["worst_group_mae"]),
                      _fmt(m["worst_group_gap"]), _fmt(m["disparity"]))
    out.print(table)
    err.print(f"wrote {run_dir / 'metrics.json'}")


# -- attach: indicators from their own polygons onto a dataset's regions ----------------------------------
@app.command()
def attach(
    name: Annotated[str, typer.Argument(help="Dataset name (or a built dataset folder).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Indicators folder (written: <out>/<dataset>/<set>.*; "
                                          "point URBANPROFILE_INDICATORS at it to use the tasks).")],
    indicators: Annotated[Path | None, _opt("Indicator polygons (GeoPackage, GeoJSON, GeoParquet, shapefile, CSV "
                                            "with WKT geometry) or a table keyed by region id (--key).")] = None,
    extensive: Annotated[str | None, _opt("Comma-separated count columns (split over regions).")] = None,
    intensive: Annotated[str | None, _opt("Comma-separated rate/median columns (averaged).")] = None,
    weights: Annotated[str | None, _opt("Dasymetric weights PATH:COLUMN: points (vector, or CSV with lon/lat) or a "
                                        "GeoTIFF (PATH[:BAND]).")] = None,
    key: Annotated[str | None, _opt("Region-id column: the table is already per region (no interpolation).")] = None,
    id_column: Annotated[str | None, _opt("Column naming the indicator features in errors.")] = None,
    crs: Annotated[str | None, _opt("CRS of an indicator file that declares none, e.g. EPSG:2263.")] = None,
    councilcount: Annotated[int | None, _opt("Instead of --indicators: the NYC ACS 5-year set by NTA from the "
                                             "councilcount package (2016 or 2023), dasymetric by tax-lot population."
                                             )] = None,
    set_name: Annotated[str | None, typer.Option("--name", help="Set name (default: the file stem, or acs<year>).",
                                                 show_default=False)] = None,
    prefix: Annotated[str, typer.Option(help="Prefix of the task names (not for --councilcount: acs_...).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a set of the same name.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Attach indicators to a dataset's regions by areal interpolation (tobler); they become the dataset's tasks."""
    import os
    import shlex

    import numpy as np

    from urbanprofile.data.indicators import ACS_CAVEAT, nyc_acs_indicators, write_indicator_set
    from urbanprofile.data.interpolate import attach_by_key, interpolate, read_indicator_layer, read_weights
    from urbanprofile.data.registry import load_dataset

    if (indicators is None) == (councilcount is None):
        raise UrbanProfileError("give either --indicators FILE or --councilcount YEAR")
    if key is not None and weights is not None:
        raise UrbanProfileError("--weights has no use with --key (a table keyed by region is not interpolated)")
    city = load_dataset(name, data_dir)
    from urbanprofile.data.registry import resolve_data_dir

    if data_dir is not None or os.environ.get("URBANPROFILE_DATA"):
        root = resolve_data_dir(data_dir).resolve()
        if out_dir.resolve() == root or root in out_dir.resolve().parents:
            raise UrbanProfileError(f"--out {out_dir} is inside the data directory {root}, which is read-only to us")
    info: dict[str, Any] = {"command": "urbanprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    if councilcount is not None:
        with err.status(f"attaching councilcount's ACS {councilcount} estimates to {city.name}"):
            attached, extra = nyc_acs_indicators(city, councilcount)
        info |= extra
        set_name = set_name or f"acs{councilcount}"
    else:
        assert indicators is not None
        ext, inten = _split(extensive) or [], _split(intensive) or []
        if key is not None:
            attached = attach_by_key(city.region_ids, read_indicator_layer(indicators, crs, key), key, [*ext, *inten],
                                     str(indicators), city.name)
        else:
            import geopandas as gpd

            layer = read_indicator_layer(indicators, crs)
            assert isinstance(layer, gpd.GeoDataFrame)
            points = read_weights(weights, crs) if weights else None
            attached = interpolate(city.regions, layer, ext, inten, points, source_name=str(indicators),
                                   id_column=id_column)
        if prefix:
            attached.values.columns = [f"{prefix}{c}" for c in attached.values.columns]
        info |= {"source": str(indicators.resolve()), "extensive": ext, "intensive": inten, "weights": weights}
        set_name = set_name or indicators.stem.lower().replace(" ", "_")
    clash = [c for c in attached.values.columns if c in city.tasks]
    if clash:
        raise UrbanProfileError(f"task {clash[0]!r} already exists in {city.name}: use --prefix or other columns")
    path = write_indicator_set(out_dir, city.name, set_name, attached, info, overwrite=overwrite)
    from urbanprofile.report.terminal import Column, FitTable

    table = FitTable([Column("task"), *(Column(h, "figure", priority=p, justify="right") for h, p in (
        ("labelled regions", 0), ("distinct values", 1), ("mean", 0), ("min", 2), ("max", 2)))],
        title=f"{set_name} on {city.name} ({attached.method})")
    for column in attached.values.columns:
        values = attached.values[column]
        table.add_row(column, str(int(values.notna().sum())), str(values.nunique()), _fmt(values.mean(), 2),
                      _fmt(values.min(), 2), _fmt(values.max(), 2))
    out.print(table)
    coverage = attached.coverage.to_numpy()
    out.print(f"coverage: {int((coverage >= 0.999).sum())} regions fully covered, "
              f"{int(((coverage > 0) & (coverage < 0.999)).sum())} partly (median {np.median(coverage):.2f}), "
              f"{int((coverage == 0).sum())} not at all")
    for note in attached.notes:
        out.print(f"note: {note}")
    if councilcount is not None and not any(ACS_CAVEAT in n for n in attached.notes):
        out.print(f"note: {ACS_CAVEAT}")
    err.print(f"wrote {path}; set URBANPROFILE_INDICATORS={out_dir} to use these as tasks of {city.name}")


# -- fit / predict: a kept model for the regions without a label ---------------------------------------
@app.command()
def fit(
    name: Annotated[str, typer.Argument(help="Dataset name, or the path of a built dataset folder.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Registered method.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Indicator to predict.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to create (must not exist).")],
    head: Annotated[str | None, typer.Option("--head", help="ridge, knn or ridge-blocks (default: the method's).")
                    ] = None,
    settings: Annotated[str, typer.Option("--protocol-for-settings", help="Inner folds choosing the head's "
                                          "settings: nested (random) or spatial (blocks).")] = "nested",
    calibration: Annotated[str, typer.Option("--calibration", help="Folds of the out-of-fold residuals that "
                                             "calibrate the intervals: spatial, nested, or auto (those matching how "
                                             "the unlabelled regions lie).")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the method, the folds and the head.")] = 0,
    data_dir: DataDir = None,
) -> None:
    """Fit a method + head on every labelled region and keep it in a model folder (no pickle)."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.predict import fit_model
    from urbanprofile.predict.folder import check_new_folder

    check_new_folder(out_dir)
    city = load_dataset(name, data_dir)
    source = str(Path(name).resolve()) if Path(name).is_dir() else name
    with err.status(f"fitting {method} on {city.name} ({task})"):
        model = fit_model(city, method, task, out_dir, head=head, protocol_for_settings=settings,
                          calibration=calibration, random_state=seed, source=source)
    m = model.config["oof_metrics"]
    err.print(f"out-of-fold ({model.config['calibration']}) on {model.config['n_labelled']} labelled regions: R² "
              f"{m['r2']:.3f}, MAE {m['mae']:.4g}")
    if calibration == "auto":
        err.print(f"calibration: {model.config['calibration_choice']['why']}", markup=False)
    err.print(f"wrote {model.folder}")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="Model folder written by `urbanprofile fit`.")],
    name: Annotated[str | None, typer.Argument(help="Dataset (default: the one the model was fit on).")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Predictions: .parquet (GeoParquet) or .gpkg.")
                        ] = Path("predictions.parquet"),
    level: Annotated[float, typer.Option("--level", help="Interval coverage level, in (0, 1).")] = 0.9,
    all_regions: Annotated[bool, typer.Option("--all", help="Predict every region, labelled ones too.")] = False,
    maps: Annotated[list[Path] | None, typer.Option("--map", help="Also draw a map: .png or .html (repeatable).")
                    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Predict the regions without a label, with conformal intervals, an applicability flag and geometry."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.predict import load_model, predict_regions
    from urbanprofile.predict.conformal import check_level
    from urbanprofile.predict.output import (
        MAP_FORMATS,
        TABLE_FORMATS,
        check_output_path,
        summary,
        write_prediction_map,
        write_predictions,
    )

    check_level(level)
    check_output_path(out_path, TABLE_FORMATS, "the predictions file")
    for path in maps or []:
        check_output_path(path, MAP_FORMATS, "a map")
    model = load_model(model_dir)
    city = load_dataset(name or model.config["dataset_source"], data_dir)
    frame = predict_regions(model, city, level=level, all_regions=all_regions)
    write_predictions(frame, out_path)
    title = f"{city.name}: {model.task} predicted by {model.method} + {model.config['head']} ({level:.0%} intervals)"
    written = [write_prediction_map(city, frame, path, title, model.config) for path in maps or []]
    facts = summary(frame)
    err.print(f"{facts['n_predicted']} regions predicted; mean {level:.0%} interval width "
              f"{facts['mean_interval_width']:.4g}; {facts['n_outside_applicability']} outside the model's "
              "applicability")
    for path in [out_path, *written]:
        err.print(f"wrote {path}")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Our own warnings speak to the user: one ``warning:`` line, not Python's ``file.py:89: RuntimeWarning``
    header and a line of our source; other libraries' warnings keep their location (it says whose they are)."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        sys.stderr.write(f"warning: {' '.join(str(message).split())}\n")
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        _main()
    finally:
        warnings.showwarning = previous  # main() also runs inside tests


def _main() -> None:
    try:
        _refuse_repeated_options(sys.argv[1:])
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # typer returns an exit code (Ctrl-C: 130) instead of exiting
            sys.exit(code)
    except UrbanProfileError as error:
        message = " ".join(str(error).split())  # always one line
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # the help has been printed: that was the answer
            sys.exit(0)
        if _is_usage_error(error):
            message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
            ctx = getattr(error, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2)
        raise


def _refuse_repeated_options(argv: list[str]) -> None:
    """Refuse an option given twice that takes one value: click silently keeps the last one, so
    ``--datasets a --datasets b`` would run ``b`` alone and ``--seeds 0 --seeds 1`` seed 1 alone.

    Raises:
        UrbanProfileError: Naming the option, and how to give several values.
    """
    # Duck-typed: newer typer releases vendor their own copy of click, whose classes are not click's.
    command: Any = typer.main.get_command(app)
    counts: dict[str, int] = {}
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            return
        if token in (getattr(command, "commands", None) or {}):
            command = command.commands[token]
            counts.clear()
            continue
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0]
        option = next((p for p in command.params if p.param_type_name == "option" and name in p.opts), None)
        if option is None or option.is_flag or option.count:
            continue
        if "=" not in token:
            next(tokens, None)  # its value, which may itself start with '-'
        if option.multiple:
            continue
        counts[option.name] = counts.get(option.name, 0) + 1  # -o and --out are one option
        if counts[option.name] == 2:
            raise UrbanProfileError(f"{name} is given more than once and only the last would count; give it once "
                                    f"(a list of values is one comma-separated argument)")


def _is_usage_error(error: Exception) -> bool:
    """A command-line mistake (unknown option, bad value): click's exceptions, or the copy of click that
    newer typer releases vendor (``typer._click``, whose exceptions are not click's)."""
    import click

    vendored = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    kinds = (click.exceptions.ClickException, *((vendored,) if vendored else ()))
    return isinstance(error, kinds) and callable(getattr(error, "format_message", None))


if __name__ == "__main__":
    main()
