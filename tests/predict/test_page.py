"""The report's prediction page for a model folder: built, self-contained, flagged regions listed; bad input is one
line."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_error, run_cli

from urbanprofile.data import CityData
from urbanprofile.predict import fit_model, predict_regions
from urbanprofile.predict.conformal import held_out_fold_coverage
from urbanprofile.predict.page import render_model_page

#: Anything a browser would fetch: a URL in src/href/url(), a protocol-relative one, or a script.
EXTERNAL = re.compile(r"""((src|href)\s*=\s*["']?(https?:)?//)|url\(\s*["']?(https?:)?//|<script|@import""", re.I)


def _masked_with_a_far_region(city: CityData) -> tuple[CityData, str]:
    targets = city.targets.copy()
    targets.loc[city.region_ids[:10], "crime"] = np.nan
    masked = replace(city, targets=targets)
    far = str(masked.region_ids[0])
    masked.views["poi_counts"].loc[masked.region_ids[0]] *= 50  # unlike every labelled region
    return masked, far


def test_page_has_card_coverage_maps_and_the_flagged_table(city: CityData, tmp_path: Path) -> None:
    masked, far = _masked_with_a_far_region(city)
    model = fit_model(masked, "raw-poi", "crime", tmp_path / "model")
    frame = predict_regions(model, masked)
    page = render_model_page(model, masked, frame, 0.9)
    assert not EXTERNAL.search(page)
    assert "default-src 'none'" in page  # the results report's strict CSP
    assert "raw-poi + ridge" in page and "Model card" in page and "seed 0" in page
    assert page.count('<figure class="map">') == 3
    assert page.count("<path ") == 3 * masked.n_regions  # every region on every map (labelled ones grey)
    flagged = re.search(r'<table class="flagged">(.*?)</table>', page, flags=re.S)
    assert flagged is not None, "no flagged-regions table"
    assert f"<td>{far}</td>" in flagged.group(1) and "embedding space" in flagged.group(1)
    n_flagged = int((~frame["applicable"]).sum())
    assert flagged.group(1).count("<tr>") == n_flagged + 1  # the header and one row per flagged region
    coverage = float(re.search(r"Measured coverage of 90% intervals: <b>([0-9.]+)</b>", page).group(1))  # type: ignore[union-attr]
    assert 0.0 < coverage <= 1.0


def test_measured_coverage_leaves_each_fold_out_of_its_own_calibration() -> None:
    """A fold whose residuals are far larger than the others' is not covered: it did not calibrate itself."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    folds = np.repeat(np.arange(4), 50)
    oof_pred = y + rng.normal(scale=0.1, size=200)
    oof_pred[folds == 3] = y[folds == 3] + 5.0  # fold 3: every prediction 5 off
    check = held_out_fold_coverage(y, oof_pred, np.ones(200), folds, 0.9)
    per_fold = {f["fold"]: f for f in check["per_fold"]}  # type: ignore[attr-defined]
    assert per_fold[3]["coverage"] == 0.0
    assert all(per_fold[k]["coverage"] >= 0.8 for k in (0, 1, 2))
    assert sum(f["n"] for f in per_fold.values()) == 200


def test_cli_report_model_writes_the_page(make_data_dir, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _fit_cli(make_data_dir, monkeypatch, capsys, tmp_path / "nyc-model")
    code, _, err = run_cli(monkeypatch, capsys, "report", "--model", str(model), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    page = (tmp_path / "rep" / "model-nyc-model.html").read_text()
    assert not EXTERNAL.search(page)
    # Every region is labelled here: the page says it shows in-sample predictions rather than an empty map.
    assert "in-sample" in page and "in-sample" in err
    assert re.search(r"Flagged regions \(\d+\)", page)


def test_cli_report_model_bad_input_is_one_line(make_data_dir, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _fit_cli(make_data_dir, monkeypatch, capsys, tmp_path / "model")
    out = tmp_path / "rep"
    cases = [
        (("--model", str(tmp_path / "nomodel")), ("nomodel", "no model folder")),
        (("--model", str(model), "--level", "1.5"), ("--level",)),
    ]
    for args, fragments in cases:
        assert_one_error(*_code_err(run_cli(monkeypatch, capsys, "report", *args, "--out", str(out))), *fragments)
    (model / "calibration.safetensors").write_bytes(b"edited")
    assert_one_error(*_code_err(run_cli(monkeypatch, capsys, "report", "--model", str(model), "--out", str(out))),
                     "calibration.safetensors", "changed after")
    (model / "manifest.json").unlink()
    assert_one_error(*_code_err(run_cli(monkeypatch, capsys, "report", "--model", str(model), "--out", str(out))),
                     "manifest.json", "missing")
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def _fit_cli(make_data_dir, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
             capsys: pytest.CaptureFixture[str], model: Path) -> Path:
    """``urbanprofile fit`` raw-all + ridge on a 40-region test city (the data directory set for what follows)."""
    monkeypatch.setenv("URBANPROFILE_DATA", str(make_data_dir(n=40)))
    code, _, err = run_cli(monkeypatch, capsys, "fit", "hafusion-testcity", "--method", "raw-all", "--task", "crime",
                           "--out", str(model))
    assert code == 0, err
    return model


def _code_err(result: tuple[int, str, str]) -> tuple[int, str]:
    return result[0], result[2]


# -- fit for learned methods: the checkpoint is chosen by inner CV on the labelled regions -------------------------
def test_fit_chooses_the_checkpoint_by_inner_cv_and_predicts_like_the_protocol(city: CityData, tmp_path: Path) -> None:
    """A learned method's candidates (training checkpoints): the informative one is kept, not the last one; the
    held-out predictions are the protocol's out-of-fold ones with the same candidates."""
    from urbanprofile.data.tasks import task_data
    from urbanprofile.evaluation.protocols import evaluate_embedding, outer_splits
    from urbanprofile.methods import get_method
    from urbanprofile.predict import load_model

    informative = get_method("raw-poi").build(random_state=0).fit_transform(city)
    informative = informative.set_axis([f"emb_{i}" for i in range(informative.shape[1])], axis=1)
    noise = informative.copy()
    noise[:] = np.random.default_rng(0).normal(size=noise.shape)
    candidates = {"epoch 10": informative, "epoch 20": noise}  # the final epoch is the useless one
    td = task_data(city, "crime")
    _, test = outer_splits(city, td, "nested")[0]
    ids = td.region_ids[test]
    targets = city.targets.copy()
    targets.loc[ids, "crime"] = np.nan
    masked = replace(city, targets=targets)
    fit_model(masked, "hafusion", "crime", tmp_path / "m", embedding=noise, candidates=candidates)
    model = load_model(tmp_path / "m")
    assert model.config["checkpoint"]["chosen"] == "epoch 10"
    assert model.embedding is not None
    np.testing.assert_allclose(model.embedding.to_numpy(), informative.to_numpy())
    oof = evaluate_embedding(city, noise, "crime", protocol="nested", head="ridge", candidates=candidates)
    frame = predict_regions(model, masked)
    np.testing.assert_allclose(frame.loc[ids, "prediction"], oof.predictions().loc[ids, "pred"], rtol=1e-9,
                               atol=1e-9)


# -- --calibration auto: the folds that hold out regions the way the unlabelled ones lie ------------------------
def test_auto_calibration_follows_how_the_gaps_lie() -> None:
    from urbanprofile.data import make_synthetic_city
    from urbanprofile.evaluation.protocols import n_spatial_blocks
    from urbanprofile.evaluation.spatial import spatial_blocks
    from urbanprofile.predict.model import choose_calibration

    city = make_synthetic_city(n_regions=144, random_state=3)
    blocks = spatial_blocks(city, n_spatial_blocks(city.n_regions))
    district = city.region_ids[blocks == 0]  # a whole block missing
    scattered = city.region_ids[::7]  # one region in seven missing, all over the city
    picks = {}
    for name, ids in (("district", district), ("scattered", scattered)):
        targets = city.targets.copy()
        targets.loc[ids, "crime"] = np.nan
        picks[name], facts = choose_calibration(replace(city, targets=targets), "crime")
        assert set(facts["mismatch"]) == {"spatial", "nested"}
    assert picks == {"district": "spatial", "scattered": "nested"}
    chosen, facts = choose_calibration(city, "crime")  # every region labelled: nothing to match
    assert chosen == "spatial" and "every region is labelled" in facts["why"]
