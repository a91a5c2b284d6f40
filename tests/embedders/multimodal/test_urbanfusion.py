"""UrbanFusion (stochastic multimodal fusion) and the concat / tfidf-captions baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from urbanprofile.data import make_synthetic_city
from urbanprofile.embedders.multimodal.modal_baselines import ConcatModalities, TfidfCaptions
from urbanprofile.embedders.multimodal.urbanfusion import UrbanFusionEmbedder, _subset
from urbanprofile.errors import MethodUnavailableError, UnknownNameError

COUNTS = ("poi", "landuse", "mobility")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))


def test_smf_subsets_are_non_empty_subsets_of_what_is_available() -> None:
    import torch

    rng = np.random.default_rng(0)
    avail = torch.from_numpy(rng.random((500, 4)) < 0.6)
    avail[avail.sum(1) == 0, 0] = True
    for keep_prob in (0.05, 0.5, 1.0):
        view = _subset(avail, keep_prob, rng).numpy()
        assert view.any(1).all() and not (view & ~avail.numpy()).any()
    assert _subset(avail, 1.0, rng).numpy().tolist() == avail.numpy().tolist()


def test_urbanfusion_trains_and_embeds_any_subset() -> None:
    city = make_synthetic_city(n_regions=48, random_state=0)
    model = UrbanFusionEmbedder(train_modalities=COUNTS, epochs=4, batch_size=16, d_model=32, random_state=0)
    full = model.fit_transform(city)
    assert full.shape == (48, 32 * len(COUNTS)) and np.isfinite(full.to_numpy()).all()  # one slot per modality
    assert model.names_ == list(COUNTS) and len(model.loss_history_) == 4
    again = UrbanFusionEmbedder(train_modalities=COUNTS, epochs=4, batch_size=16, d_model=32,
                                random_state=0).fit_transform(city)
    np.testing.assert_allclose(full.to_numpy(), again.to_numpy(), atol=1e-5)  # seeded
    model.modalities = ("poi",)
    only_poi = model.transform(city)
    assert only_poi.shape == full.shape and not np.allclose(only_poi.to_numpy(), full.to_numpy())
    model.modalities = ("location",)
    with pytest.raises(MethodUnavailableError, match="not trained"):
        model.transform(city)
    with pytest.raises(UnknownNameError, match="unknown modality 'sound'"):
        UrbanFusionEmbedder(train_modalities=("sound",)).fit(city)


def test_urbanfusion_contrastive_loss_goes_down_and_absent_items_are_masked() -> None:
    city = make_synthetic_city(n_regions=64, random_state=1)
    # Regions 0..9 have no POI item: their poi row must not be used (it is NaN, masked), and they still embed.
    city.cache["region_modalities"] = {}
    model = UrbanFusionEmbedder(train_modalities=COUNTS, epochs=15, batch_size=32, d_model=32, random_state=0)
    from urbanprofile.embedders.multimodal.urbanfusion import city_modalities

    feats = city_modalities(city, COUNTS)
    values, present, skipped = city.cache["region_modalities"]["poi"]
    present = present.copy()
    present[:10] = False
    values = values.copy()
    values[:10] = np.nan
    city.cache["region_modalities"]["poi"] = (values, present, skipped)
    assert feats.present["poi"].all()
    out = model.fit_transform(city)
    assert np.isfinite(out.to_numpy()).all()
    assert np.mean(model.loss_history_[-5:]) < model.loss_history_[0]
    model.modalities = ("poi",)
    with pytest.raises(MethodUnavailableError, match="10 region"):
        model.transform(city)


def _caption_city(n: int = 40) -> Any:
    city = make_synthetic_city(n_regions=n, random_state=2)
    words = ["river park trees", "factory warehouse trucks", "shops cafes restaurants", "apartments housing"]
    rows = [(rid, f"The tile shows {words[i % 4]} near a road.") for i, rid in enumerate(city.region_ids)]
    rows += [(rid, "A second sentence about traffic.") for rid in city.region_ids[::2]]
    city.modalities["tile_caption"] = pd.DataFrame(rows, columns=["region_id", "text"])
    return city


def test_concat_and_tfidf_baselines() -> None:
    city = _caption_city()
    tfidf = TfidfCaptions(n_components=8, random_state=0).fit_transform(city)
    assert tfidf.shape[0] == 40 and np.isfinite(tfidf.to_numpy()).all()
    concat = ConcatModalities(modalities=("text", "poi")).fit(city)
    emb = concat.transform(city)
    assert emb.shape == (40, 384 + city.views["poi_counts"].shape[1])
    blocks = emb.to_numpy()
    np.testing.assert_allclose((blocks[:, :384] ** 2).sum(1).mean(), 1.0, rtol=0.05)  # unit-variance block
    with pytest.raises(MethodUnavailableError, match="no 'streetview' modality"):
        ConcatModalities(modalities=("streetview",)).fit(city)


def test_with_modalities_and_cli_records_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from urbanprofile.cli import app
    from urbanprofile.methods import get_method, with_modalities

    spec = with_modalities(get_method("urbanfusion"), ["location", "text"])
    assert spec.name == "urbanfusion[location,text]" and spec.params["modalities"] == ("location", "text")
    with pytest.raises(MethodUnavailableError, match="does not take --modalities"):
        with_modalities(get_method("raw-poi"), ["poi"])
    root = _write_cityview(tmp_path, n=30)
    result = CliRunner().invoke(app, ["evaluate", "cityview-tiny", "--method", "concat", "--modalities",
                                      "location,text", "--task", "carbon", "--protocol", "nested", "--seeds", "0",
                                      "--json", "--data-dir", str(root)])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["method"] == "concat[location,text]" and row["modalities"] == ["location", "text"]
    bad = CliRunner().invoke(app, ["evaluate", "cityview-tiny", "--method", "concat", "--modalities", "image",
                                   "--task", "carbon", "--seeds", "0", "--data-dir", str(root)])
    assert isinstance(bad.exception, MethodUnavailableError) and "no 'image' modality" in str(bad.exception)


def _write_cityview(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    labels = root / "cityview" / "labels"
    labels.mkdir(parents=True)
    lines = ["satellite_img_name,BD09 coordinate,WGS84 coordinate,carbon_emissions (ton),population (unit),"
             "gdp (million yuan)"]
    captions = []
    kinds = ["dense housing", "farmland", "industrial sheds", "a park"]
    for i in range(n):
        lat, lon = 39.8 + 0.01 * (i % 6), 116.3 + 0.01 * (i // 6)
        carbon = 100 + 50 * (i % 4) + rng.random()
        lines.append(f'Tiny/16_{i}_1_s.jpg,"({i},1)","({lat}, {lon})",{carbon},{100 * (i % 3) + 5},{i + 1}')
        captions.append([{"caption": f"The tile shows {kinds[i % 4]}.", "image": f"Tiny/16_{i}_1_s.jpg"}])
    (labels / "Tiny.csv").write_text("\n".join(lines) + "\n")
    (root / "cityview" / "captions").mkdir()
    (root / "cityview" / "captions" / "Tiny_captions.json").write_text(json.dumps(captions))
    return root


def test_urbanfusion_tokens_readout_keeps_one_slot_per_modality() -> None:
    city = make_synthetic_city(n_regions=40, random_state=3)
    kwargs: dict[str, Any] = {"train_modalities": COUNTS, "epochs": 2, "batch_size": 16, "d_model": 16,
                              "random_state": 0}
    mean = UrbanFusionEmbedder(readout="mean", **kwargs).fit(city)
    tokens = UrbanFusionEmbedder(**kwargs).fit(city)  # the default read-out
    wide = tokens.transform(city).to_numpy()
    assert wide.shape == (40, 16 * len(COUNTS)) and np.isfinite(wide).all()
    # Same training (the losses use the mean read-out): the mean of the slots is the mean read-out.
    np.testing.assert_allclose(wide.reshape(40, len(COUNTS), 16).mean(1), mean.transform(city).to_numpy(),
                               atol=1e-5)
    tokens.modalities = ("poi",)  # absent slots are filled from the tokens present, never NaN
    only_poi = tokens.transform(city).to_numpy()
    assert only_poi.shape == wide.shape and np.isfinite(only_poi).all()
    with pytest.raises(ValueError, match="readout must be one of"):
        UrbanFusionEmbedder(readout="max", **kwargs).fit(city)
