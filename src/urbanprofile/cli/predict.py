"""Commands that keep a model for the regions without a label: fit it, then predict with intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from urbanprofile.clikit import DataDir, err

# The project's data, evaluation, benchmark and report modules are imported inside each command, not here: they
# pull pandas and scikit-learn (about 2 s measured with `python -X importtime` on this busy 2-core machine, where
# `urbanprofile --help` takes 0.3 s), which --help, --version and a mistyped option must not pay.


# -- fit / predict: a kept model for the regions without a label ---------------------------------------
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
    interval: Annotated[str, typer.Option("--interval", help="normalised (the full model +- scaled residual "
                                          "quantile) or cv+ (the calibration folds' own models; keeps one head "
                                          "per fold).")] = "normalised",
    widths: Annotated[str, typer.Option("--widths", help="How widths vary: difficulty (scaled by each region's "
                                        "difficulty), constant, or auto (difficulty where it holds on the "
                                        "calibration folds).")] = "auto",
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
                          calibration=calibration, random_state=seed, source=source, interval=interval,
                          widths=widths)
    m = model.config["oof_metrics"]
    err.print(f"out-of-fold ({model.config['calibration']}) on {model.config['n_labelled']} labelled regions: R² "
              f"{m['r2']:.3f}, MAE {m['mae']:.4g}")
    if calibration == "auto":
        err.print(f"calibration: {model.config['calibration_choice']['why']}", markup=False)
    if "why" in model.config["widths_choice"]:
        err.print(f"widths: {model.config['widths_choice']['why']}", markup=False)
    err.print(f"wrote {model.folder}")


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
