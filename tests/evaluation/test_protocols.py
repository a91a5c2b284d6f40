"""Protocols, metrics and geographic bias, on synthetic cities and on the real benchmark."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import sparse

from urbanprofile.data import CityData, load_dataset, task_data
from urbanprofile.evaluation import evaluate_embedding, outer_splits
from urbanprofile.evaluation.metrics import r2
from urbanprofile.evaluation.protocols import get_protocol, n_spatial_blocks
from urbanprofile.evaluation.spatial import morans_i, spatial_blocks
from urbanprofile.methods import get_method


def test_morans_i_signs() -> None:
    # A path graph: a smooth gradient is positively autocorrelated, an alternating pattern negatively.
    n = 50
    w = sparse.diags([np.ones(n - 1), np.ones(n - 1)], [-1, 1]).tocsr()
    assert morans_i(np.arange(n, dtype=float), w) > 0.9
    assert morans_i(np.tile([1.0, -1.0], n // 2), w) < -0.9


def test_spatial_folds_are_contiguous_blocks(city: CityData) -> None:
    td = task_data(city, "crime")
    folds = outer_splits(city, td, "spatial")
    assert len(folds) == 5
    blocks = spatial_blocks(city, n_spatial_blocks(city.n_regions))
    for train, test in folds:
        assert not set(blocks[test]) & set(blocks[train])  # no block is split across train and test
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(len(td.y)))


def test_another_block_seed_is_another_layout_of_whole_blocks(city: CityData) -> None:
    td = task_data(city, "crime")
    spatial = get_protocol("spatial")
    own = outer_splits(city, td, spatial)
    assert [t.tolist() for _, t in own] == [t.tolist() for _, t in outer_splits(city, td, "spatial")]
    other = replace(spatial, block_seed=1)
    folds = outer_splits(city, td, other)
    blocks = spatial_blocks(city, n_spatial_blocks(city.n_regions), seed=1)
    for train, test in folds:
        assert not set(blocks[test]) & set(blocks[train])
    assert sorted(np.concatenate([t for _, t in folds]).tolist()) == list(range(len(td.y)))
    assert [t.tolist() for _, t in folds] != [t.tolist() for _, t in own]
    embedding = get_method("raw-poi").build().fit_transform(city)
    assert evaluate_embedding(city, embedding, "crime", other).protocol == "spatial"


def test_nested_result_has_metrics_and_bias(city: CityData) -> None:
    embedding = get_method("raw-poi").build().fit_transform(city)
    result = evaluate_embedding(city, embedding, "checkin", "nested")
    assert result.metrics["r2"] > 0.5  # check-ins follow POIs in the synthetic city
    assert np.isclose(result.metrics["r2"], r2(result.y, result.pred))
    bias = result.bias
    assert set(bias["block_r2"]) == {"0", "1", "2", "3", "4"}
    assert bias["r2_gap"] == pytest.approx(result.metrics["r2"] - bias["worst_block_r2"])
    assert bias["weights"] == "neighbors" and np.isfinite(bias["morans_i"])
    assert (result.pred >= 0).all()


def test_knn_location_head(city: CityData) -> None:
    spec = get_method("knn-location")
    embedding = spec.build().fit_transform(city)
    result = evaluate_embedding(city, embedding, "service_calls", "spatial", head=spec.head)
    assert all("k" in c for c in result.chosen)


def test_same_seed_same_numbers(city: CityData) -> None:
    spec = get_method("autoencoder")
    a = spec.build(random_state=1).fit_transform(city)
    b = spec.build(random_state=1).fit_transform(city)
    c = spec.build(random_state=2).fit_transform(city)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    assert not np.allclose(a.to_numpy(), c.to_numpy())


@pytest.mark.parametrize(("name", "expected"), [("hafusion-nyc", 0.764), ("hafusion-chicago", 0.915)])
def test_paper_protocol_reproduces_published_raw_poi(data_dir: Path, name: str, expected: float) -> None:
    city = load_dataset(name, data_dir)
    embedding = get_method("raw-poi").build().fit_transform(city)
    result = evaluate_embedding(city, embedding, "checkin", "paper")
    assert round(result.metrics["r2"], 3) == expected


def test_cityview_location_baseline_is_strong(data_dir: Path) -> None:
    city = load_dataset("cityview-beijing", data_dir)
    spec = get_method("knn-location")
    embedding = spec.build().fit_transform(city)
    result = evaluate_embedding(city, embedding, "carbon", "spatial", head=spec.head)
    assert result.metrics["r2"] > 0.7  # coordinates alone explain most of a smooth gridded product


def test_embedding_with_missing_rows_or_nans_is_refused(city: CityData) -> None:
    from urbanprofile.errors import DataError

    embedding = city.views["poi_counts"].astype(float)
    with pytest.raises(DataError, match="has no row for region 5"):
        evaluate_embedding(city, embedding.drop(index=5), "crime", "nested")
    broken = embedding.copy()
    broken.iloc[3, 0] = np.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        evaluate_embedding(city, broken, "crime", "paper")
