"""Command-line interface: a thin shell over data, methods, evaluation and the benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from urbanprofile.errors import MethodUnavailableError, UrbanProfileError

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

def _console(stderr: bool = False) -> Console:
    """A console that wraps to the terminal, or never cuts a table when output goes to a pipe or file."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, width=100_000)


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
    try:
        return [int(v) for v in _split(value) or []]
    except ValueError:
        raise UrbanProfileError(f"--seeds must be comma-separated integers, got {value!r}") from None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


# -- datasets ----------------------------------------------------------------------------------------
@datasets_app.command("list")
def datasets_list(data_dir: DataDir = None) -> None:
    """List the datasets discovered in the data directory (reads no arrays)."""
    from urbanprofile.data.registry import discover

    entries = discover(data_dir)
    table = Table("dataset", "family", "path", "status")
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

    city = load_dataset(name, data_dir)
    summary = city.summary()
    summary["task_rows"] = {t: task_data(city, t).describe() for t in city.tasks}
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    out.print(f"[bold]{city.name}[/bold]: {city.meta.get('description', '')}")
    out.print(f"source: {city.meta.get('source')}")
    out.print(f"locations: {city.meta.get('location_source')}")
    views = Table("view", "shape")
    for view, shape in summary["views"].items():
        views.add_row(view, " x ".join(map(str, shape)))
    out.print(views)
    labels = Table("task", "n", "missing", "zeros", "mean", "std", "min", "max", "used for evaluation")
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
    from urbanprofile.methods import get_method, list_methods

    table = Table("method", "head", "views", "needs", "seeds", "description")
    for name in list_methods():
        spec = get_method(name)
        needs = ", ".join([*spec.requires_views, *(["locations"] if spec.needs_locations else [])])
        table.add_row(name, spec.head, spec.describe_views() or "-", needs or "-",
                      "several" if spec.stochastic else "one", spec.description)
    out.print(table)


# -- embed -------------------------------------------------------------------------------------------
@app.command()
def embed(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method name.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .parquet or .csv file.")],
    seed: Annotated[int, typer.Option("--seed", help="random_state of the method.")] = 0,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Fit a method on a dataset and write one embedding row per region."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.methods import get_method

    spec = get_method(method)
    suffix = out_path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise UrbanProfileError(f"{out_path}: output must end in .parquet or .csv")
    n_threads = _threads(threads)
    city = load_dataset(name, data_dir)
    spec = spec.for_city(city)
    embedder = spec.build(random_state=seed)
    if hasattr(embedder, "on_epoch"):  # a trained method: show its epochs
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"training {method} on {name}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err) as bar:
            job = bar.add_task("train", total=None)
            embedder.on_epoch = lambda epoch, total: bar.update(job, completed=epoch, total=total)
            embedding = embedder.fit_transform(city)
    else:
        with err.status(f"fitting {method} on {name}"):
            embedding = embedder.fit_transform(city)
    from urbanprofile.data.io import write_atomic

    write_atomic(out_path, embedding.to_parquet if suffix == ".parquet" else embedding.to_csv)
    err.print(f"wrote {embedding.shape[0]} regions x {embedding.shape[1]} dimensions to {out_path} "
              f"(views: {', '.join(spec.all_views) or '-'}; {n_threads} threads)")


# -- evaluate and benchmark --------------------------------------------------------------------------
def _print_rows_json(row: dict[str, Any]) -> None:
    from urbanprofile.benchmark.runner import row_to_json

    sys.stdout.write(json.dumps(row_to_json(row)) + "\n")
    sys.stdout.flush()


def _leaderboard_table(rows: list[dict[str, Any]], title: str) -> Table:
    from urbanprofile.benchmark.runner import format_mean_std, leaderboard

    board = leaderboard(rows)
    table = Table("dataset", "task", "protocol", "method", "head", "n", "R²", "MAE", "RMSE", "worst-block R²",
                  "Moran's I", "fit s", "seeds", title=title)
    for r in board.to_dict("records"):
        protocol = "paper (peers', for comparison)" if r["protocol"] == "paper" else r["protocol"]
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
    method: Annotated[str, typer.Option("--method", "-m", help="Method name.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task (indicator) name, or 'all' (one row per task).")],
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="paper, nested or spatial.")] = "nested",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "0,1,2,3,4",
    head: Annotated[str | None, typer.Option(
        "--head", help="Head: ridge, knn, mlp, mlp-multitask, moe, prompt4re-<model>[-notask], concat-<model> "
        "(default: the method's own).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per result.")] = False,
    modalities: Annotated[str | None, typer.Option(
        "--modalities", help="Modalities used at inference, e.g. location,text (urbanfusion, concat).")] = None,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate one method (and head) on one task, or all tasks, under one protocol, over seeds."""
    from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
    from urbanprofile.heads.registry import parse_head

    if head:
        parse_head(head)  # a typo fails before any data is read
    _threads(threads)
    if modalities is not None:
        from urbanprofile.methods import get_method, with_modalities

        method = with_modalities(get_method(method), _split(modalities) or []).name
    plan = BenchmarkPlan(datasets=[name], methods=[method], tasks=None if task == "all" else [task],
                         protocols=[protocol], seeds=_seeds(seeds), heads=[head] if head else None)
    outcome = run_benchmark(plan, data_dir, store=None, progress=not as_json,
                            on_row=_print_rows_json if as_json else None)
    if not outcome.rows and outcome.skipped:
        raise MethodUnavailableError(outcome.skipped[0])
    if outcome.failed and len(outcome.failed) == len(outcome.rows):
        raise UrbanProfileError(f"{method} on {name} failed: {outcome.failed[0]['error']}")
    for row in outcome.failed:
        err.print(f"failed: {row['task']} {row['protocol']} seed {row['seed']}: {row['error']}")
    for line in outcome.skipped:
        err.print(f"skipped: {line}")
    if not as_json and outcome.rows:
        out.print(_leaderboard_table(outcome.rows, f"{method} on {name}"))


@app.command()
def benchmark(
    datasets: Annotated[str | None, typer.Option("--datasets", help="Comma-separated datasets (default all).")] = None,
    methods: Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (default all).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated tasks (default all).")] = None,
    protocols: Annotated[str, typer.Option("--protocols", help="Comma-separated protocols.")] = "paper,nested,spatial",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds (stochastic methods).")] = "0,1,2,3,4",
    store_path: Annotated[Path, typer.Option("--store", help="DuckDB results store.")] = Path(
        "results/urbanprofile.duckdb"),
    heads: Annotated[str | None, typer.Option(
        "--heads", help="Comma-separated heads (default: each method's own head).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per requested row on stdout (stored earlier or now: see 'resumed').")] = False,
    executor: Annotated[str, typer.Option(
        "--executor", help="Where units run: serial, processes (see --jobs) or ray (pip install 'urbanprofile[ray]').")
    ] = "serial",
    jobs: Annotated[int | None, typer.Option(
        "--jobs", help="Local worker processes (or CPUs of a local Ray instance).", show_default=False)] = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="Ray cluster to join: auto or HOST:PORT (default: a local Ray instance).",
        show_default=False)] = None,
    retries: Annotated[int, typer.Option("--retries", help="Retries of a unit whose worker died or raised.")] = 2,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Run a grid of datasets x methods x tasks x protocols x seeds x heads; rows of the same code are reused."""
    from urbanprofile.benchmark.executors import make_executor
    from urbanprofile.benchmark.runner import BenchmarkPlan, describe_recomputed, run_benchmark, validate_plan
    from urbanprofile.benchmark.store import ResultStore

    plan = BenchmarkPlan(
        datasets=_split(datasets), methods=_split(methods), tasks=_split(tasks),
        protocols=_split(protocols) or [], seeds=_seeds(seeds), heads=_split(heads),
    )
    if retries < 0:
        raise UrbanProfileError(f"--retries must be at least 0, got {retries}")
    _threads(threads)
    runner = make_executor(executor, jobs=jobs, address=address, retries=retries, threads=threads)
    validate_plan(plan, data_dir)
    with ResultStore(store_path) as store:
        outcome = run_benchmark(plan, data_dir, store=store, progress=True,
                                on_row=_print_rows_json if as_json else None, executor=runner)
    for line in outcome.skipped:
        err.print(f"skipped: {line}")
    for line in describe_recomputed(outcome):
        err.print(f"recomputed: {line}")
    for row in outcome.failed:
        err.print(f"failed: {row['dataset']} {row['task']} {row['method']} {row['protocol']} seed {row['seed']}: "
                  f"{row['error']}")
    console = err if as_json else out
    rows = outcome.resumed_rows + outcome.rows
    if any(r.get("status") != "failed" for r in rows):
        console.print(_leaderboard_table(rows, "leaderboard (mean ± std over seeds)"))
    failed = f", {len(outcome.failed)} failed" if outcome.failed else ""
    console.print(
        f"{len(outcome.rows) - len(outcome.failed)} new results{failed}, {outcome.n_resumed} already in "
        f"{store_path}, {outcome.n_units} units on {runner.name}, {outcome.wall_seconds:.1f} s"
    )


@app.command()
def report(
    store_path: Annotated[Path, typer.Option("--store", help="DuckDB results store to report on.")] = Path(
        "results/urbanprofile.duckdb"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for index.html.")] = Path("report"),
    no_maps: Annotated[bool, typer.Option("--no-maps", help="Leave out the per-block maps (needs no data).")] = False,
    data_dir: DataDir = None,
) -> None:
    """Write a static, self-contained HTML report of a results store (leaderboards, bias, seeds, maps)."""
    from urbanprofile.report.html import write_report

    with err.status(f"writing the report of {store_path}"):
        written = write_report(store_path, out_dir, data_dir=data_dir, with_maps=not no_maps)
    for note in written.notes:
        err.print(f"note: {note}")
    err.print(f"wrote {written.path} ({written.n_rows} rows, {written.n_datasets} datasets, {written.maps} maps)")


# -- build and map -----------------------------------------------------------------------------------
def _opt(help_text: str) -> Any:
    return typer.Option(help=help_text, show_default=False)


@app.command()
def build(
    city: Annotated[str, typer.Argument(help="Short lowercase city name; the dataset is built-<city>.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to create (e.g. DATA/built/<city>).")],
    regions: Annotated[Path | None, typer.Option(help="Region polygons (GeoParquet, GeoJSON, GPKG, shapefile).",
                                                 show_default=False)] = None,
    region_id_column: Annotated[str | None, _opt("Field holding region ids (default region_id, else 0..N-1).")] = None,
    region_name_column: Annotated[str | None, _opt("Field holding region names (shown on maps).")] = None,
    boundary: Annotated[str | None, _opt("Boundary to cut into H3 cells: vector file, .osm.pbf, or W,S,E,N.")] = None,
    h3_res: Annotated[int | None, typer.Option("--h3-res", help="H3 resolution (0-15).", show_default=False)] = None,
    h3_centres_only: Annotated[bool, typer.Option(
        "--h3-centres-only", help="Keep only H3 cells whose centre is inside the boundary.")] = False,
    pois: Annotated[Path | None, _opt("POI points (vector file, CSV/Parquet with lon/lat, or .osm.pbf).")] = None,
    category_column: Annotated[str | None, _opt("POI category field (default: category).")] = None,
    categories: Annotated[str | None, _opt("Comma-separated categories, or a JSON list/mapping file.")] = None,
    lon_column: Annotated[str, typer.Option(help="Longitude column of CSV/Parquet tables.")] = "lon",
    lat_column: Annotated[str, typer.Option(help="Latitude column of CSV/Parquet tables.")] = "lat",
    landuse: Annotated[Path | None, _opt("Land-use polygons with a class field (or .osm.pbf).")] = None,
    landuse_class_column: Annotated[str, typer.Option(help="Land-use class field.")] = "class",
    trips: Annotated[Path | None, _opt(
        "Trips (CSV/Parquet): origin,destination ids, or both ends' coordinates (o_lon..., pickup_/dropoff_ "
        "longitude/latitude, start_/end_ lat/lng, origin_/destination_ ...).")] = None,
    trip_columns: Annotated[str | None, _opt("2 id columns or 4 coordinate columns, comma-separated.")] = None,
    trip_time_column: Annotated[str | None, _opt("Departure time column (default: time, when present).")] = None,
    time_patterns: Annotated[int, typer.Option(help="Time-of-day patterns the trips are split into.")] = 4,
    labels: Annotated[Path | None, _opt("Labels: CSV/Parquet keyed by region id, or points with values.")] = None,
    label_id_column: Annotated[str, typer.Option(help="Region-id column of the labels table.")] = "region_id",
    label_columns: Annotated[str | None, _opt("Comma-separated label columns (of --labels, else of --regions).")
                             ] = None,
    label_agg: Annotated[str, typer.Option(help="Aggregation of point labels per region.")] = "mean",
    crs: Annotated[str | None, _opt("CRS of inputs that declare none (and of CSV coordinates), e.g. EPSG:31983.")
                   ] = None,
    join_engine: Annotated[str, typer.Option(help="Spatial join: auto, geopandas or duckdb.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
) -> None:
    """Build a dataset folder from raw geodata files (regions or H3 cells, POIs, land use, trips, labels)."""
    import shlex

    from urbanprofile.data.build import BuildSpec, build_dataset

    spec = BuildSpec(
        city=city, regions=regions, region_id_column=region_id_column, region_name_column=region_name_column,
        boundary=boundary, h3_resolution=h3_res, h3_cover=not h3_centres_only, pois=pois,
        category_column=category_column,
        categories=categories if categories is None or categories.endswith(".json") else _split(categories),
        lon_column=lon_column, lat_column=lat_column, landuse=landuse, landuse_class_column=landuse_class_column,
        trips=trips, trip_columns=_split(trip_columns), trip_time_column=trip_time_column,
        n_time_patterns=time_patterns, labels=labels, label_id_column=label_id_column,
        label_columns=_split(label_columns), label_agg=label_agg, crs=crs, join_engine=join_engine,
    )
    command = "urbanprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = build_dataset(spec, out_dir, overwrite=overwrite, progress=True, command=command)
    for line in report.warnings():
        err.print(f"warning: {line}")
    table = Table("figure", "value", title=f"built-{city}: {report.region_kind} regions, {report.join_engine} join")
    rows = [
        ("regions", report.n_regions),
        ("POIs joined / read", f"{report.n_pois_joined} / {report.n_pois_read}" if pois else "-"),
        ("POI categories", report.n_categories or "-"),
        ("land-use classes", report.n_landuse_classes or "-"),
        ("trips kept / read", f"{report.n_trips_kept} / {report.n_trips_read}" if trips else "-"),
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
    layer: Annotated[str, typer.Option("--layer", "-l", help=(
        "view:<view>[:<column>], label:<task>, prediction:<task>, residual:<task> or bias:<task>."))],
    out_paths: Annotated[list[Path], typer.Option("--out", "-o", help="Output .png or .html (repeatable).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method for prediction/residual/bias layers.")
                      ] = "raw-poi",
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="Protocol for the model layers.")] = "nested",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the method and protocol.")] = 0,
    threads: Threads = None,
    data_dir: DataDir = None,
) -> None:
    """Draw a choropleth of a view, label, prediction, residual or per-block bias as PNG and/or HTML."""
    from urbanprofile.data.registry import load_dataset
    from urbanprofile.report.maps import check_map_path, map_city

    for path in out_paths:
        check_map_path(path)
    _threads(threads)  # the model layers fit a method
    city = load_dataset(name, data_dir)
    with err.status(f"mapping {layer} of {city.name}"):
        written = map_city(city, layer, list(out_paths), method=method, protocol=protocol, seed=seed)
    for path in written:
        err.print(f"wrote {path}")


# -- r1: GRPO post-training of a language-model region profiler ----------------------------------------
r1_app = typer.Typer(help="Urban-R1: GRPO post-training of a language-model region profiler.", no_args_is_help=True)
app.add_typer(r1_app, name="r1")


@r1_app.command("train")
def r1_train(
    datasets: Annotated[str, typer.Option("--datasets", "-d", help="Comma-separated datasets (one city each).")],
    task: Annotated[str, typer.Option("--task", "-t", help="Indicator asked about.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run folder (created; resumed if it holds a run).")],
    model: Annotated[str, typer.Option("--model", help="smollm2, tiny-random or a causal-LM folder.")] = "smollm2",
    steps: Annotated[int, typer.Option("--steps", help="GRPO steps.")] = 60,
    generations: Annotated[int, typer.Option("--generations", "-G", help="Completions per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Completion length limit.")] = 4,
    answer: Annotated[str, typer.Option("--answer", help="level or number.")] = "level",
    n_levels: Annotated[int, typer.Option("--levels", help="Levels of the answer scale.")] = 5,
    protocol: Annotated[str, typer.Option("--protocol", "-p", help="Whose folds hold regions out.")] = "spatial",
    fold: Annotated[int, typer.Option("--fold", help="Held-out outer fold of each city.")] = 0,
    blocks_per_city: Annotated[int, typer.Option("--blocks-per-city", help="Geographic groups per city.")] = 2,
    holdout_city: Annotated[str | None, typer.Option("--holdout-city", help="Hold this dataset out whole (train on "
                                                 "the others; --protocol and --fold then play no part).")] = None,
    learning_rate: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 5e-4,
    beta: Annotated[float, typer.Option("--beta", help="KL penalty to the base model.")] = 0.04,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank (0: full fine-tuning).")] = 16,
    balanced: Annotated[bool, typer.Option("--balanced/--unbalanced", help="One prompt per group per step.")] = True,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 10,
    sft: Annotated[bool, typer.Option("--sft/--no-sft", help="Also train the SFT baseline (same budget).")] = True,
    engine: Annotated[str, typer.Option("--engine", help="prefix (prompt-sharing) or trl (GRPOTrainer).")] = "prefix",
    lora_layers: Annotated[int, typer.Option("--lora-layers", help="LoRA on the last N layers (0: all).")] = 4,
    sft_learning_rate: Annotated[float, typer.Option("--sft-lr", help="Learning rate of the SFT baseline.")] = 5e-4,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = 1.0,
    reward: Annotated[str, typer.Option("--reward", help="Accuracy reward: debiased (distance minus its mean over "
                                        "the city's training targets), distance or exact.")] = "debiased",
    init: Annotated[str, typer.Option("--init", help="Where GRPO starts: base, or sft (the run's SFT model, "
                                      "trained first; also the KL reference).")] = "base",
    scale_rewards: Annotated[bool, typer.Option(
        "--scale-rewards/--no-scale-rewards",
        help="Divide advantages by the group's reward spread (GRPO as published; default off: Dr. GRPO).")] = False,
    entropy_coef: Annotated[float, typer.Option("--entropy-coef", help="Weight of an entropy bonus on the "
                                                "completion tokens (0: none).")] = 0.0,
    constrain_answer: Annotated[bool, typer.Option(
        "--constrain-answer/--free-answer",
        help="Draw the level digit among the valid levels only (sampling, GRPO and evaluation).")] = False,
    threads: Threads = None,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when visible), cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from the last checkpoint.")] = True,
    data_dir: DataDir = None,
) -> None:
    """Post-train with GRPO (and the SFT baseline) on the training regions; writes the run folder."""
    from urbanprofile.rl.policy import check_model_path
    from urbanprofile.rl.train import R1Config, prepare_task, train_grpo, train_sft

    config = R1Config(
        datasets=_split(datasets) or [], task=task, model=model, answer=answer, n_levels=n_levels, protocol=protocol,
        fold=fold, blocks_per_city=blocks_per_city, holdout_city=holdout_city, steps=steps, generations=generations,
        max_new_tokens=max_new_tokens, learning_rate=learning_rate, beta=beta, lora_rank=lora_rank,
        balanced=balanced, save_every=save_every, sft=sft, engine=engine, lora_layers=lora_layers, random_state=seed,
        sft_learning_rate=sft_learning_rate, temperature=temperature, reward=reward,
        scale_rewards=scale_rewards, init=init, entropy_coef=entropy_coef, constrain_answer=constrain_answer,
        data_dir=str(data_dir) if data_dir else None, device=device,
    )
    from urbanprofile.rl.policy import resolve_device

    resolve_device(device)  # an unknown device or a missing GPU stops here, before any data is read
    _threads(threads)
    check_model_path(model)
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
    from urbanprofile.rl.evaluate import evaluate_run
    from urbanprofile.rl.policy import resolve_device
    from urbanprofile.rl.train import load_cities, read_config

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
    table = Table("method", "Spearman", "Spearman (mean level)", "level MAE", "level R²", "parse failures",
                  "worst group MAE", "worst-group gap", "disparity", title=f"held-out regions ({payload['n_test']})")
    for name, m in payload["methods"].items():
        if "skipped" in m:
            err.print(f"{name}: skipped, {m['skipped']}")
            continue
        table.add_row(name, _fmt(m["spearman"]), _fmt(m.get("spearman_expected_level")), _fmt(m["level_mae"]),
                      _fmt(m["level_r2"]), f"{m['parse_failure_rate']:.0%}", _fmt(m["worst_group_mae"]),
                      _fmt(m["worst_group_gap"]), _fmt(m["disparity"]))
    out.print(table)
    err.print(f"wrote {run_dir / 'metrics.json'}")


def main() -> None:
    """Entry point: user mistakes become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except UrbanProfileError as error:
        message = " ".join(str(error).split())  # always one line
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except Exception as error:
        if _is_usage_error(error):
            message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
            ctx = getattr(error, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            sys.stderr.write(f"error: {message}{hint}\n")
            sys.exit(2)
        raise


def _is_usage_error(error: Exception) -> bool:
    """A command-line mistake (unknown option, bad value): click's exceptions, or the copy of click that
    newer typer releases vendor (``typer._click``, whose exceptions are not click's)."""
    import click

    vendored = getattr(getattr(typer, "exceptions", None), "TyperException", None)
    kinds = (click.exceptions.ClickException, *((vendored,) if vendored else ()))
    return isinstance(error, kinds) and callable(getattr(error, "format_message", None))


if __name__ == "__main__":
    main()
