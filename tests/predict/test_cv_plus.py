"""fit --interval cv+: the calibration folds' own heads make the interval; kept, reloaded and checked like the rest."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_error, run_cli

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.data.tasks import task_data
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation.protocols import evaluate_embedding, outer_splits
from urbanprofile.methods import get_method
from urbanprofile.predict import fit_model, load_model, predict_regions
from urbanprofile.predict.conformal import conformal_intervals, cv_plus_intervals
from urbanprofile.predict.folder import ModelFolderError


def _masked(city: CityData, task: str, ids: pd.Index) -> CityData:
    targets = city.targets.copy()
    targets.loc[ids, task] = np.nan
    return replace(city, targets=targets)


def test_cv_plus_with_agreeing_folds_is_the_normalised_interval() -> None:
    """When every fold model predicts what the full model predicts, CV+ reduces to the normalised interval."""
    rng = np.random.default_rng(0)
    residuals = rng.normal(size=60)
    cal_sigmas = rng.uniform(0.5, 2.0, size=60)
    pred = rng.normal(size=7)
    sigmas = rng.uniform(0.5, 2.0, size=7)
    folds = np.repeat(np.arange(5), 12)
    lower, upper = cv_plus_intervals(np.tile(pred, (5, 1)), folds, np.abs(residuals) / cal_sigmas, sigmas, 0.9)
    ref_lower, ref_upper = conformal_intervals(pred, sigmas, residuals, cal_sigmas, 0.9)
    np.testing.assert_allclose(lower, ref_lower, rtol=1e-9)
    np.testing.assert_allclose(upper, ref_upper, rtol=1e-9)
    # Folds that disagree at a region widen its interval beyond the agreeing one.
    spread = np.tile(pred, (5, 1)) + np.linspace(-1, 1, 5)[:, None]
    wide_lower, wide_upper = cv_plus_intervals(spread, folds, np.abs(residuals) / cal_sigmas, sigmas, 0.9)
    assert ((wide_upper - wide_lower) > (upper - lower)).all()


def test_fit_cv_plus_keeps_one_head_per_fold_and_reloads(city: CityData, tmp_path: Path) -> None:
    masked = _masked(city, "crime", city.region_ids[::3])
    fitted = fit_model(masked, "raw-poi", "crime", tmp_path / "m", interval="cv+", calibration="spatial")
    n_folds = len(outer_splits(masked, task_data(masked, "crime"), "spatial"))
    assert fitted.config["interval"] == "cv+" and len(fitted.fold_heads) == n_folds
    assert sorted(p.name for p in (tmp_path / "m").glob("fold-head-*.skops")) == [
        f"fold-head-{k}.skops" for k in range(n_folds)]
    model = load_model(tmp_path / "m")
    a = predict_regions(fitted, masked)
    b = predict_regions(model, masked)
    pd.testing.assert_frame_equal(pd.DataFrame(a.drop(columns="geometry")), pd.DataFrame(b.drop(columns="geometry")))
    assert ((b["lower"] <= b["prediction"]) & (b["prediction"] <= b["upper"])).all() and (b["lower"] >= 0).all()
    normalised = predict_regions(fit_model(masked, "raw-poi", "crime", tmp_path / "n", calibration="spatial"),
                                 masked)
    np.testing.assert_allclose(normalised["prediction"], b["prediction"])  # the point prediction is the same
    assert not np.allclose(normalised["interval_width"], b["interval_width"])
    (tmp_path / "m" / "fold-head-1.skops").unlink()
    with pytest.raises(ModelFolderError, match=r"fold-head-1\.skops is missing"):
        load_model(tmp_path / "m")


def test_cv_plus_coverage_on_held_out_regions(tmp_path: Path) -> None:
    city = make_synthetic_city(n_regions=144, random_state=3)
    truth = city.targets["crime"]
    inside = []
    for k, (_, test) in enumerate(outer_splits(city, task_data(city, "crime"), "spatial")):
        ids = task_data(city, "crime").region_ids[test]
        masked = _masked(city, "crime", ids)
        frame = predict_regions(fit_model(masked, "raw-poi", "crime", tmp_path / f"m{k}", interval="cv+"),
                                masked).loc[ids]
        inside.append((truth.loc[ids] >= frame["lower"]) & (truth.loc[ids] <= frame["upper"]))
    coverage = float(pd.concat(inside).mean())
    assert 0.8 <= coverage < 1.0, coverage


def test_cv_plus_with_checkpoints_reads_each_folds_own(city: CityData, tmp_path: Path) -> None:
    """A fold whose inner CV chose another checkpoint than the kept one reads that checkpoint at predict time."""
    informative = get_method("raw-poi").build(random_state=0).fit_transform(city)
    informative = informative.set_axis([f"emb_{i}" for i in range(informative.shape[1])], axis=1)
    other = informative * np.random.default_rng(1).uniform(0.5, 1.5, size=informative.shape)
    candidates = {"epoch 10": informative, "epoch 20": other}
    masked = _masked(city, "crime", city.region_ids[::4])
    fitted = fit_model(masked, "hafusion", "crime", tmp_path / "m", embedding=other, candidates=candidates,
                       interval="cv+")
    labels = fitted.config["fold_candidates"]
    kept = fitted.config["checkpoint"]["chosen"]
    assert set(labels) == {"epoch 10", "epoch 20"}, labels  # this city's folds choose both
    assert set(fitted.config["fold_embedding_files"]) == set(labels) - {kept}
    oof = evaluate_embedding(masked, other, "crime", protocol=fitted.config["calibration"], head="ridge",
                             candidates=candidates)
    assert [c["candidate"] for c in oof.chosen] == labels
    model = load_model(tmp_path / "m")
    pd.testing.assert_frame_equal(pd.DataFrame(predict_regions(fitted, masked).drop(columns="geometry")),
                                  pd.DataFrame(predict_regions(model, masked).drop(columns="geometry")))


def test_bad_interval_is_one_line(city: CityData, tmp_path: Path, make_data_dir,  # type: ignore[no-untyped-def]
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UrbanProfileError, match="--interval must be one of normalised, cv\\+, got 'jackknife'"):
        fit_model(city, "raw-poi", "crime", tmp_path / "m", interval="jackknife")
    assert not (tmp_path / "m").exists()
    monkeypatch.setenv("URBANPROFILE_DATA", str(make_data_dir(n=40)))
    code, _, err = run_cli(monkeypatch, capsys, "fit", "hafusion-testcity", "--method", "raw-all", "--task",
                           "crime", "--interval", "jackknife", "--out", str(tmp_path / "cli"))
    assert_one_error(code, err, "--interval", "jackknife")
    assert not (tmp_path / "cli").exists()
    code, _, err = run_cli(monkeypatch, capsys, "fit", "hafusion-testcity", "--method", "raw-all", "--task", "crime",
                           "--interval", "cv+", "--out", str(tmp_path / "cli"))
    assert code == 0, err
    assert load_model(tmp_path / "cli").config["interval"] == "cv+"
    assert "widths: " in err  # what --widths auto chose, and why


def test_widths_auto_keeps_the_difficulty_only_where_it_holds() -> None:
    """Areas whose errors differ in scale, told apart by the difficulty, keep it; a difficulty pointing the wrong way
    gives one width."""
    from urbanprofile.predict.model import choose_scale

    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(5), 80)
    sigma = 0.2 * 3.0 ** folds + rng.uniform(0, 0.05, size=len(folds))  # each area its own error scale
    y = np.zeros(len(folds))
    pred = rng.normal(scale=sigma)
    chosen, facts = choose_scale("auto", y, pred, sigma, folds, -np.inf)
    assert chosen == "difficulty", facts  # one width calibrated on the other areas misses the loud one
    wrong = sigma[::-1].copy()  # small exactly where the errors are large
    chosen, facts = choose_scale("auto", y, pred, wrong, folds, -np.inf)
    assert chosen == "constant", facts
    assert set(facts["held_out_coverage"]) == {"difficulty", "constant"}
    assert choose_scale("constant", y, pred, sigma, folds, -np.inf)[0] == "constant"
