"""UrbanVLP on synthetic frozen-encoder arrays, and PerceptionScore."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from urbanprofile.embedders.multimodal.perception import (
    ONLY_CLIP_NOTE,
    align_image_tower,
    clip_score,
    cycle_score,
    perception_score,
)
from urbanprofile.embedders.multimodal.urbanvlp import (
    UrbanVLPEmbedder,
    UrbanVLPNetwork,
    VLPInputs,
    token_similarity,
)
from urbanprofile.errors import DataError, UrbanProfileError


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Small models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_inputs(n: int = 96, seed: int = 0, images: bool = True) -> VLPInputs:
    """Tiles whose caption depends on a latent land use that their street-view captions also reflect."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 4))
    text_map = rng.normal(size=(4, 24))
    loc_map = rng.normal(size=(2, 12))
    xy = rng.uniform(-1, 1, size=(n, 2))
    per_tile = rng.integers(0, 4, size=n)
    item_region = np.repeat(np.arange(n), per_tile)
    m = len(item_region)
    item_xy = xy[item_region] + rng.normal(scale=0.05, size=(m, 2))
    item_text = latent[item_region] @ text_map + rng.normal(scale=0.3, size=(m, 24))
    tokens = np.repeat(item_text[:, None, :], 5, axis=1) + rng.normal(scale=0.5, size=(m, 5, 24))
    token_mask = np.ones((m, 5), dtype=bool)
    token_mask[::3, 3:] = False
    tile_image = np.hstack([latent, rng.normal(size=(n, 4))]) if images else None
    has_tile_image = (rng.random(n) < 0.3) if images else None
    return VLPInputs(
        region_ids=pd.Index([f"t{k}" for k in range(n)], name="region_id"),
        tile_text=(latent @ text_map + rng.normal(scale=0.3, size=(n, 24))).astype(np.float32),
        has_tile_text=rng.random(n) > 0.05,
        tile_location=np.tanh(xy @ loc_map).astype(np.float32),
        tile_image=tile_image,
        has_tile_image=has_tile_image,
        item_region=item_region,
        item_text=item_text.astype(np.float32),
        item_location=np.tanh(item_xy @ loc_map).astype(np.float32),
        item_tokens=tokens.astype(np.float32),
        item_token_mask=token_mask,
    )


def test_token_similarity_matches_equations_6_and_7() -> None:
    rng = np.random.default_rng(1)
    v, t = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 4, 5))
    v_mask = np.array([[1, 1], [1, 0], [1, 1]], dtype=bool)
    t_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    sim_vt, sim_tv = token_similarity(torch.tensor(v), torch.tensor(v_mask), torch.tensor(t), torch.tensor(t_mask))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    vn, tn = unit(v), unit(t)
    for i in range(3):
        for j in range(3):
            s = vn[i][v_mask[i]] @ tn[j][t_mask[j]].T
            assert sim_vt[i, j].item() == pytest.approx(s.max(axis=1).mean(), abs=1e-6)
            s2 = tn[i][t_mask[i]] @ vn[j][v_mask[j]].T
            assert sim_tv[i, j].item() == pytest.approx(s2.max(axis=1).mean(), abs=1e-6)


def test_pretraining_aligns_regions_with_their_captions() -> None:
    inputs = synthetic_inputs()
    model = UrbanVLPEmbedder(d=16, epochs=25, batch_size=32, token_batch=32, random_state=0).fit_inputs(inputs)
    assert model.losses_[-1]["global"] < 0.7 * model.losses_[0]["global"]
    assert model.losses_[-1]["token"] < model.losses_[0]["token"]
    # Retrieval: the fused region vector finds its own caption far above chance (1/n).
    fused = model.transform_inputs(inputs).iloc[:, :16].to_numpy()
    text = model.text_embedding(inputs.tile_text)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    top5 = np.argsort(-(fused @ text.T), axis=1)[:, :5]
    hit = np.mean([k in row for k, row in enumerate(top5)])
    assert hit > 0.3


def test_transform_is_inductive_and_deterministic() -> None:
    model = UrbanVLPEmbedder(d=8, epochs=2, batch_size=32, random_state=3).fit_inputs(synthetic_inputs())
    other = synthetic_inputs(n=40, seed=5, images=False)
    other.item_region = other.item_region[:0]
    for name in ("item_text", "item_location", "item_tokens", "item_token_mask"):
        setattr(other, name, None)
    emb = model.transform_inputs(other)
    assert emb.shape == (40, 5 * 8)
    assert emb.index.equals(other.region_ids)
    again = UrbanVLPEmbedder(d=8, epochs=2, batch_size=32, random_state=3).fit_inputs(synthetic_inputs())
    np.testing.assert_allclose(again.transform_inputs(other).to_numpy(), emb.to_numpy())
    only = UrbanVLPEmbedder(d=8, epochs=1, embedding="location+text", random_state=0).fit_inputs(synthetic_inputs())
    assert only.transform_inputs(other).shape == (40, 16)


def test_bad_inputs_and_parameters_raise_one_line_errors() -> None:
    inputs = synthetic_inputs()
    inputs.tile_text[4, 0] = np.nan
    with pytest.raises(DataError, match="tile_text row 4"):
        UrbanVLPEmbedder(epochs=1).fit_inputs(inputs)
    inputs = synthetic_inputs()
    inputs.has_item_text = np.ones(inputs.n_items, dtype=bool)
    inputs.has_item_text[2] = False
    with pytest.raises(DataError, match="item 2 has neither a photo nor a caption"):
        UrbanVLPEmbedder(epochs=1).fit_inputs(inputs)
    inputs = synthetic_inputs()
    inputs.has_tile_text[:] = False
    with pytest.raises(DataError, match="no tile has a caption"):
        UrbanVLPEmbedder(epochs=1).fit_inputs(inputs)
    with pytest.raises(ValueError, match="embedding must be"):
        UrbanVLPEmbedder(embedding="fused+pixels").fit_inputs(synthetic_inputs())


def test_clip_score_and_the_missing_cycle_half_is_never_faked() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(clip_score(a, b), [2.5, 2.5 / np.sqrt(2), 0.0])
    result = perception_score(a, b)
    assert result.only_clip and result.perception_score is None and result.note == ONLY_CLIP_NOTE
    with pytest.raises(UrbanProfileError, match="a segmenter is missing"):
        perception_score(a, b, text_to_image=lambda caption: np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UrbanProfileError, match="cannot be loaded"):
        perception_score(a, b, text_to_image="no_such_module:generate", segmenter="no_such_module:segment")


def test_cycle_score_runs_when_both_models_are_supplied() -> None:
    images = [np.full((4, 4, 3), v, np.uint8) for v in (0, 255)]

    def segment(image: np.ndarray) -> np.ndarray:  # two classes: dark and bright pixels
        bright = float((image.mean(axis=2) > 127).mean())
        return np.array([1 - bright, bright])

    def generate(caption: str) -> np.ndarray:
        return np.full((4, 4, 3), 255 if "bright" in caption else 0, np.uint8)

    assert cycle_score(images[0], "a dark scene", generate, segment) == pytest.approx(1.0)
    assert cycle_score(images[0], "a bright scene", generate, segment) == pytest.approx(0.0)
    vectors = np.eye(2)
    result = perception_score(vectors, vectors, images, ["a dark scene", "a dark scene"], generate, segment)
    assert result.cycle_score is not None and result.perception_score is not None
    np.testing.assert_allclose(result.cycle_score, [1.0, 0.0])
    np.testing.assert_allclose(result.perception_score, [(2.5 + 1.0) / 2, (2.5 + 0.0) / 2])


def test_image_tower_alignment_scores_matched_pairs_above_mismatched() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(12, 6))
    text = latent @ rng.normal(size=(6, 24))
    image = np.hstack([latent @ rng.normal(size=(6, 10)), rng.normal(scale=0.1, size=(12, 4))])
    network = UrbanVLPNetwork(text_dim=24, location_dim=3, image_dim=14, d=8)
    align_image_tower(network, image, text, epochs=80)
    with torch.no_grad():
        iv = network.encode_image(torch.as_tensor(image, dtype=torch.float32)).numpy()
        tv = network.encode_text(torch.as_tensor(text, dtype=torch.float32)).numpy()
    matched = clip_score(iv, tv).mean()
    mismatched = clip_score(iv, np.roll(tv, 1, axis=0)).mean()
    assert matched > mismatched + 0.3


def test_caption_cut_and_token_spacing() -> None:
    from urbanprofile.embedders.multimodal.urbanvlp_inputs import evenly_spaced_tokens, truncate_words

    assert truncate_words("a b c d e", 3) == "a b c"
    assert truncate_words("a b", 3) == "a b"
    assert truncate_words("a b c", None) == "a b c"
    tokens = np.arange(10)[:, None] * np.ones((1, 2))
    kept = evenly_spaced_tokens(tokens, 4)
    assert kept[:, 0].tolist() == [0, 3, 6, 9]
    assert evenly_spaced_tokens(tokens[:3], 4).shape == (3, 2)


def test_inputs_from_a_city_skip_and_report_bad_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real frozen encoders on a six-tile city: a corrupt photo and a tile without caption are reported."""
    pytest.importorskip("transformers")
    Image = pytest.importorskip("PIL.Image")
    import geopandas as gpd

    from urbanprofile.data.city import CityData
    from urbanprofile.embedders.multimodal.urbanvlp_inputs import vlp_inputs_from_city

    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))
    ids = pd.Index([f"16_1_{k}" for k in range(6)], name="region_id")
    lon, lat = 116.3 + 0.01 * np.arange(6), np.full(6, 39.9)
    regions = gpd.GeoDataFrame({"lon": lon, "lat": lat}, index=ids, geometry=gpd.points_from_xy(lon, lat),
                               crs="EPSG:4326")
    good, corrupt, photo = tmp_path / "good.jpg", tmp_path / "bad.jpg", tmp_path / "sv.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(photo)
    corrupt.write_bytes(b"not a jpeg")
    words = ["dense residential blocks", "a factory with trucks", "farmland and a river", "a park", "a rail yard"]
    modalities = {
        "tile_caption": pd.DataFrame({"region_id": [ids[k % 5] for k in range(10)],
                                      "text": [f"The tile shows {words[k % 5]}." for k in range(10)]}),
        "tile_image": pd.DataFrame({"region_id": [ids[0], ids[1]], "image": [str(good), str(corrupt)]}),
        "streetview_caption": pd.DataFrame({
            "region_id": [ids[0], ids[0], ids[2], ids[5]], "item": ["a", "b", "c", "d"],
            "text": ["A street lined with shops and bicycles " * 8, "Trees and a bus stop.", "A gate.", "A wall."],
            "lon": lon[[0, 0, 2, 5]] + 0.001, "lat": lat[[0, 0, 2, 5]]}),
        "streetview_image": pd.DataFrame({"region_id": [ids[2]], "image": [str(photo)], "item": ["c"],
                                          "lon": [lon[2] + 0.001], "lat": [lat[2]]}),
    }
    city = CityData(name="tiny", regions=regions, targets=pd.DataFrame(index=ids), modalities=modalities)
    inputs = vlp_inputs_from_city(city, max_tokens=8, max_words=16, progress=False)
    assert inputs.has_tile_text.tolist() == [True] * 5 + [False]
    assert inputs.has_tile_image is not None and inputs.has_tile_image.tolist() == [True] + [False] * 5
    assert any("1 tile photo(s) skipped as unreadable" in note for note in inputs.notes)
    assert any("1 of 6 tiles have no caption" in note for note in inputs.notes)
    assert any("1 of 4 street-view captions encoded from their first 16 words" in n for n in inputs.notes)
    assert inputs.item_token_mask is not None and inputs.item_token_mask.shape == (4, 8)
    assert inputs.item_token_mask[0].all() and not inputs.item_token_mask[3].all()
    assert inputs.has_item_image is not None and inputs.has_item_image.tolist() == [False, False, True, False]
    np.testing.assert_allclose(np.linalg.norm(inputs.tile_text[:5], axis=1), 1.0, rtol=1e-5)
    model = UrbanVLPEmbedder(d=8, epochs=2, batch_size=4, max_tokens=8, random_state=0).fit(city)
    emb = model.transform(city)
    assert emb.shape == (6, 40) and np.isfinite(emb.to_numpy()).all()
