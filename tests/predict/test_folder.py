"""Model folders: a round trip gives the same predictions; a missing, edited, foreign or unsafe file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from urbanprofile.data import CityData
from urbanprofile.predict import fit_model, load_model, predict_regions
from urbanprofile.predict.folder import MANIFEST, ModelFolderError, sha256


def _hide_labels(city: CityData, task: str = "crime", every: int = 4) -> CityData:
    city.targets.loc[city.region_ids[::every], task] = np.nan
    return city


@pytest.fixture
def model_dir(city: CityData, tmp_path: Path) -> Path:
    fit_model(_hide_labels(city), "pca", "crime", tmp_path / "model")
    return tmp_path / "model"


def test_round_trip_predicts_the_same(city: CityData, tmp_path: Path) -> None:
    city = _hide_labels(city)
    fitted = fit_model(city, "pca", "crime", tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    first = predict_regions(fitted, city)
    again = predict_regions(loaded, city)
    pd.testing.assert_frame_equal(pd.DataFrame(first.drop(columns="geometry")),
                                  pd.DataFrame(again.drop(columns="geometry")))
    assert len(first) == city.targets["crime"].isna().sum()
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert files == {"model.json", "manifest.json", "head.skops", "embedder.skops", "calibration.safetensors",
                     "training.parquet", "fit_regions.parquet"}
    config = json.loads((tmp_path / "model" / "model.json").read_text())
    assert config["fingerprint"]["n_regions"] == city.n_regions
    assert config["random_state"] == 0 and config["urbanprofile_version"]
    # Nothing pickled: no file holds a pickle stream (protocol 2+ starts with 0x80).
    for path in (tmp_path / "model").iterdir():
        assert not path.read_bytes().startswith(b"\x80"), path.name


def test_missing_file_is_named(model_dir: Path) -> None:
    (model_dir / "head.skops").unlink()
    with pytest.raises(ModelFolderError, match=r"head\.skops is missing"):
        load_model(model_dir)


def test_edited_file_is_refused(model_dir: Path) -> None:
    config = json.loads((model_dir / "model.json").read_text())
    config["thresholds"]["embedding"] = 1e9  # someone widens the applicability domain by hand
    (model_dir / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"model\.json: changed after"):
        load_model(model_dir)


def test_other_format_version_is_refused(model_dir: Path) -> None:
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["format_version"] = 999
    (model_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match="format 999"):
        load_model(model_dir)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no model folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match=r"manifest\.json is missing"):
        load_model(tmp_path / "empty")


class Intruder:
    """A type that is neither a probe nor a baseline embedder."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_untrusted_type_is_refused_even_with_a_matching_hash(model_dir: Path) -> None:
    import skops.io as sio

    sio.dump(Intruder(), model_dir / "head.skops")
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["files"]["head.skops"] = sha256(model_dir / "head.skops")  # a forger updates the manifest too
    (model_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelFolderError, match=r"Intruder.*does not load"):
        load_model(model_dir)


def test_existing_or_orphan_output_is_refused_and_nothing_is_left(city: CityData, model_dir: Path,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="already exists"):
        fit_model(city, "pca", "crime", model_dir)
    with pytest.raises(ModelFolderError, match="does not exist"):
        fit_model(city, "pca", "crime", tmp_path / "no" / "model")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Exception, match="unknown task"):
        fit_model(city, "pca", "no-such-task", tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no half-written or hidden folder
