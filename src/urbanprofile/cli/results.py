"""Commands that show results: the HTML report of a results store and choropleth maps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from urbanprofile.clikit import DataDir, Parents, Threads, check_output, err, set_threads, writing

# The project's data, evaluation, benchmark and report modules are imported inside each command, not here: they
# pull pandas and scikit-learn (about 2 s measured with `python -X importtime` on this busy 2-core machine, where
# `urbanprofile --help` takes 0.3 s), which --help, --version and a mistyped option must not pay.


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

    check_output(out_dir, parents=parents, folder=True)
    if model_dir is not None:
        _report_model(model_dir, out_dir, level, data_dir)
        return
    with err.status(escape(f"writing the report of {store_path}")), writing(out_dir / "index.html"):
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
        check_output(path, parents=parents)
    set_threads(threads)  # the model layers fit a method
    city = load_dataset(name, data_dir)
    with err.status(escape(f"mapping {layer} of {city.name}")):
        resolved = layer_values(city, layer, method=method, protocol=protocol, seed=seed)
        written = []
        for path in out_paths:
            with writing(path):
                written.append(write_map(city, resolved, path))
    for path in written:
        err.print(f"wrote {path}")
