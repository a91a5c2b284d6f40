"""fit / predict: held-out predictions are the out-of-fold ones; intervals, flags and bad input behave."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import DataError, MethodUnavailableError, UrbanProfileError
from urbanprofile.evaluation.protocols import evaluate_embedding, n_spatial_blocks, outer_splits
from urbanprofile.evaluation.spatial import spatial_blocks
from urbanprofile.methods import get_method
from urbanprofile.predict import fit_model, load_model, predict_regions


def _masked(city: CityData, task: str, ids: pd.Index) -> CityData:
    targets = city.targets.copy()
    targets.loc[ids, task] = np.nan
    return replace(city, targets=targets)


@pytest.mark.parametrize(("method", "protocol"), [("raw-poi", "spatial"), ("knn-location", "nested")])
def test_held_out_predictions_are_the_out_of_fold_ones(city: CityData, tmp_path: Path, method: str,
                                                       protocol: str) -> None:
    """One code path: fitting on the other folds and predicting a fold gives evaluate_embedding's predictions."""
    emb = get_method(method).build(random_state=0).fit_transform(city)
    oof = evaluate_embedding(city, emb, "crime", protocol=protocol, head=get_method(method).head).predictions()
    td = task_data(city, "crime")
    for k, (_, test) in enumerate(outer_splits(city, td, protocol)[:2]):
        ids = td.region_ids[test]
        masked = _masked(city, "crime", ids)
        model = fit_model(masked, method, "crime", tmp_path / f"m{k}", protocol_for_settings=protocol)
        frame = predict_regions(model, masked)
        np.testing.assert_allclose(frame.loc[ids, "prediction"], oof.loc[ids, "pred"], rtol=1e-9, atol=1e-9)


def test_intervals_are_normalised_and_grow_with_the_level(city: CityData, tmp_path: Path) -> None:
    masked = _masked(city, "crime", city.region_ids[::3])
    model = fit_model(masked, "raw-poi", "crime", tmp_path / "m")
    narrow = predict_regions(model, masked, level=0.8)
    wide = predict_regions(model, masked, level=0.95)
    assert ((narrow["lower"] <= narrow["prediction"]) & (narrow["prediction"] <= narrow["upper"])).all()
    assert (wide["interval_width"] >= narrow["interval_width"] - 1e-9).all()
    assert (wide["interval_width"] > narrow["interval_width"]).any()
    assert narrow["interval_width"].std() > 0  # residual-scaled: width follows difficulty
    assert (narrow["lower"] >= 0).all()  # counts: never below zero


def test_coverage_on_held_out_regions_is_near_the_level(tmp_path: Path) -> None:
    """A synthetic city whose labels follow its POIs: 90% intervals cover most held-out labels, not all."""
    city = make_synthetic_city(n_regions=144, random_state=3)
    truth = city.targets["crime"]
    td = task_data(city, "crime")
    inside = []
    for k, (_, test) in enumerate(outer_splits(city, td, "spatial")):
        ids = td.region_ids[test]
        masked = _masked(city, "crime", ids)
        frame = predict_regions(fit_model(masked, "raw-poi", "crime", tmp_path / f"m{k}"), masked).loc[ids]
        inside.append((truth.loc[ids] >= frame["lower"]) & (truth.loc[ids] <= frame["upper"]))
    coverage = float(pd.concat(inside).mean())
    assert 0.8 <= coverage < 1.0, coverage


def test_far_regions_are_flagged_with_a_reason(city: CityData, tmp_path: Path) -> None:
    masked = _masked(city, "crime", city.region_ids[:8])
    model = fit_model(masked, "raw-poi", "crime", tmp_path / "m")
    far = masked.region_ids[0]
    masked.views["poi_counts"].loc[far] *= 50  # a region unlike any labelled one
    masked.regions.loc[far, ["lon", "lat"]] = masked.regions.loc[far, ["lon", "lat"]].to_numpy() + 1.0
    frame = predict_regions(model, masked)
    assert not frame.loc[far, "applicable"]
    assert "embedding space" in frame.loc[far, "applicability_reason"]
    assert "on the map" in frame.loc[far, "applicability_reason"]
    assert frame.drop(index=far)["applicable"].mean() >= 0.8
    assert (frame.loc[frame["applicable"], "applicability_reason"] == "").all()


def test_flag_colours_on_a_city_without_polygons(city: CityData, tmp_path: Path) -> None:
    """Every region applicable must draw green, also when regions are centroid dots (a constant flag layer)."""
    from urbanprofile.predict.output import FLAG_COLOURS, render_png

    dots = replace(city, regions=city.regions.set_geometry(gpd.points_from_xy(city.regions["lon"],
                                                                               city.regions["lat"])))
    masked = _masked(dots, "crime", dots.region_ids[::4])
    frame = predict_regions(fit_model(masked, "raw-poi", "crime", tmp_path / "m"), masked)
    frame["applicable"] = True
    render_png(masked, frame, "dots", tmp_path / "dots.png")
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "dots.png").convert("RGB")).reshape(-1, 3)
    red = np.array([int(FLAG_COLOURS[0][i:i + 2], 16) for i in (1, 3, 5)])
    assert not (np.abs(pixels - red).sum(axis=1) < 30).any()


def test_transfer_only_where_the_method_embeds_new_regions(city: CityData, tmp_path: Path) -> None:
    masked = _masked(city, "crime", city.region_ids[::4])
    other = make_synthetic_city(n_regions=30, n_poi_categories=12, random_state=5)
    other.regions.index = other.regions.index.map(lambda r: f"x{r}")
    other = CityData("other", other.regions, {k: v.set_axis(other.regions.index) for k, v in other.views.items()},
                     other.targets.set_axis(other.regions.index), meta=other.meta)
    poi = fit_model(masked, "raw-poi", "crime", tmp_path / "poi")
    assert len(predict_regions(load_model(tmp_path / "poi"), other, all_regions=True)) == 30  # counts per category
    renamed = replace(other, views={**other.views, "poi_counts": other.views["poi_counts"].rename(
        columns=lambda c: f"{c}_v2")})
    with pytest.raises(MethodUnavailableError, match=r"'poi_counts'.*does not match"):
        predict_regions(poi, renamed)
    fit_model(masked, "raw-all", "crime", tmp_path / "all")
    with pytest.raises(MethodUnavailableError, match=r"region 'x0' .*cannot embed new regions"):
        predict_regions(load_model(tmp_path / "all"), other)
    lacking = replace(masked, views={k: v for k, v in masked.views.items() if k != "od_flows"})
    with pytest.raises(MethodUnavailableError, match="no 'od_flows' view"):
        predict_regions(load_model(tmp_path / "all"), lacking)


def test_learned_method_predicts_its_own_regions_only(city: CityData, tmp_path: Path) -> None:
    """A transductive embedder's stored embedding serves a rebuilt city with the same regions, or a subset."""
    masked = _masked(city, "crime", city.region_ids[::4])
    emb = get_method("pca").build(random_state=0).fit_transform(city)  # stands in for hafusion's output
    fitted = fit_model(masked, "hafusion", "crime", tmp_path / "m", embedding=emb)
    model = load_model(tmp_path / "m")
    pd.testing.assert_frame_equal(pd.DataFrame(predict_regions(fitted, masked).drop(columns="geometry")),
                                  pd.DataFrame(predict_regions(model, masked).drop(columns="geometry")))
    assert model.embedding is not None and model.embedder is None
    subset = masked.subset(masked.region_ids[:20])
    assert len(predict_regions(model, subset, all_regions=True)) == 20
    grown = make_synthetic_city(n_regions=80, random_state=0)
    with pytest.raises(MethodUnavailableError, match=r"hafusion cannot embed new regions \(it learns"):
        predict_regions(model, grown)


def test_bad_options(city: CityData, tmp_path: Path) -> None:
    masked = _masked(city, "crime", city.region_ids[::4])
    model = fit_model(masked, "raw-poi", "crime", tmp_path / "m")
    for level in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(UrbanProfileError, match="--level must be between 0 and 1"):
            predict_regions(model, masked, level=level)
    with pytest.raises(UrbanProfileError, match="needs at least 999 calibration regions"):
        predict_regions(model, masked, level=0.999)
    with pytest.raises(UrbanProfileError, match="nothing to predict"):
        predict_regions(model, city)
    few = _masked(city, "crime", city.region_ids[8:])
    with pytest.raises(DataError, match="only 8 labelled regions"):
        fit_model(few, "raw-poi", "crime", tmp_path / "few")
    blocks = spatial_blocks(city, n_spatial_blocks(city.n_regions))
    corner = city.region_ids[blocks == np.bincount(blocks).argmax()]  # labels in one spatial block only
    assert len(corner) >= 10
    with pytest.raises(UrbanProfileError, match="at least 2 folds"):
        fit_model(_masked(city, "crime", city.region_ids.difference(corner)), "raw-poi", "crime", tmp_path / "c",
                  calibration="spatial")
    with pytest.raises(UrbanProfileError, match="--protocol-for-settings must be one of"):
        fit_model(masked, "raw-poi", "crime", tmp_path / "p", protocol_for_settings="paper")
    with pytest.raises(UrbanProfileError, match="head 'mlp' cannot be kept"):
        fit_model(masked, "raw-poi", "crime", tmp_path / "h", head="mlp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# -- the command line, run in process (each subprocess would import everything again) -----------------------
def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from urbanprofile.cli import main

    monkeypatch.setattr(sys, "argv", ["urbanprofile", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _one_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_fit_predict_and_bad_input(make_data_dir, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                       capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = make_data_dir(n=40)
    monkeypatch.setenv("URBANPROFILE_DATA", str(data))
    model = tmp_path / "model"
    code, err = _cli(monkeypatch, capsys, "fit", "hafusion-testcity", "--method", "raw-all", "--task", "crime",
                     "--out", str(model), "--protocol-for-settings", "spatial")
    assert code == 0, err
    out = tmp_path / "pred.gpkg"
    code, err = _cli(monkeypatch, capsys, "predict", str(model), "--all", "--out", str(out), "--level", "0.8",
                     "--map", str(tmp_path / "m.png"), "--map", str(tmp_path / "m.html"))
    assert code == 0, err
    frame = gpd.read_file(out)
    assert len(frame) == 40 and {"prediction", "lower", "upper", "applicable", "applicability_reason"} <= set(frame)
    assert (frame["level"] == 0.8).all() and frame.geometry.notna().all()
    page = (tmp_path / "m.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # self-contained: nothing fetched
    assert page.count('data-c2="') == 40
    assert "raw-all + ridge" in page and "out-of-fold (spatial)" in page  # the model card
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")

    cases = [
        (("predict", str(model), "--all", "--level", "1.5", "--out", str(tmp_path / "a.parquet")), ("--level",)),
        (("predict", str(model), "--all", "--out", str(tmp_path / "no" / "a.parquet")), ("does not exist",)),
        (("predict", str(model), "--all", "--out", str(tmp_path / "a.csv")), ("a.csv", ".parquet or .gpkg")),
        (("predict", str(tmp_path / "nomodel"), "--out", str(tmp_path / "a.parquet")), ("nomodel",)),
        (("predict", str(model), "hafusion-testcity", "--out", str(tmp_path / "a.parquet")), ("nothing to predict",)),
        (("fit", "hafusion-testcity", "--method", "raw-all", "--task", "crime", "--out", str(model)),
         ("already exists",)),
        (("fit", "hafusion-testcity", "--method", "raw-all", "--task", "crime", "--out", str(tmp_path / "x" / "m")),
         ("does not exist",)),
    ]
    for args, fragments in cases:
        _one_error(*_cli(monkeypatch, capsys, *args), *fragments)
    (model / "training.parquet").write_bytes(b"edited")
    _one_error(*_cli(monkeypatch, capsys, "predict", str(model), "--all", "--out", str(tmp_path / "b.parquet")),
               "training.parquet", "changed after")
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "b.parquet").exists()


# -- the tutorial page, run block by block as written -------------------------------------------------------
TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial_predict.md"


def test_tutorial_predict(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Every ```bash (urbanprofile commands) and ```python block of docs/tutorial_predict.md, in order."""
    import os
    import shlex

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    blocks = re.findall(r"```(bash|python)\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    assert [kind for kind, _ in blocks] == ["python", "bash", "bash", "bash", "python"]
    namespace: dict[str, object] = {}
    for kind, body in blocks:
        if kind == "python":
            exec(compile(body, str(TUTORIAL), "exec"), namespace)
            continue
        args = shlex.split(os.path.expandvars(body.replace("\\\n", " ")))
        assert args[0] == "urbanprofile"
        code, err = _cli(monkeypatch, capsys, *args[1:])
        assert code == 0, err
    printed = capsys.readouterr().out
    assert "141 held-back sectors" in printed
    coverage = float(namespace["coverage"])  # type: ignore[arg-type]
    assert 0.8 <= coverage <= 0.97, coverage
    # The page quotes what it prints; keep the two in step.
    quoted = re.search(r"this prints `(.*?)`", TUTORIAL.read_text().replace("\n", " "))
    assert quoted is not None and quoted.group(1) in " ".join(printed.split()), printed
    assert (tmp_path / "olinda-predictions.html").is_file() and (tmp_path / "olinda-predictions.png").is_file()
