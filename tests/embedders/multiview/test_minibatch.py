"""Mini-batch training of the multi-view embedders: seeded, the full-batch step at one batch, no N x N, clear errors."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest
from torch_helpers import LargestTensor

from urbanprofile.data.loaders.synthetic import make_synthetic_city
from urbanprofile.embedders.multiview.hafusion import HAFusionEmbedder
from urbanprofile.embedders.multiview.mgfn import MGFNEmbedder
from urbanprofile.embedders.multiview.minibatch import compact_batches
from urbanprofile.embedders.multiview.srel import SRELEmbedder
from urbanprofile.errors import MethodUnavailableError, ParameterError

SMALL = {"d": 16, "n_heads": 2, "epochs": 2, "feedforward": None}


@pytest.fixture(scope="module")
def city() -> Any:
    return make_synthetic_city(n_regions=90, n_poi_categories=8, random_state=0)


@pytest.mark.parametrize("cls", [HAFusionEmbedder, SRELEmbedder])
def test_same_seed_same_numbers_and_other_seed_others(city: Any, cls: type) -> None:
    def run(seed: int) -> np.ndarray:
        return cls(**SMALL, mode="minibatch", batch_size=32, random_state=seed).fit_transform(city).to_numpy()

    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert np.isfinite(first).all() and first.shape == (city.n_regions, 16)


def test_negatives_join_each_batch_seeded_and_distinct(city: Any) -> None:
    from urbanprofile.embedders.multiview.minibatch import with_negatives

    index = np.arange(10, 40)
    extended = with_negatives(index, city.n_regions, 20, np.random.default_rng(0))
    assert extended[:30].tolist() == index.tolist() and len(extended) == 50
    assert len(set(extended.tolist())) == 50  # distinct, none from the batch
    again = with_negatives(index, city.n_regions, 20, np.random.default_rng(0))
    assert extended.tolist() == again.tolist()

    def run(negatives: int) -> np.ndarray:
        return HAFusionEmbedder(**SMALL, mode="minibatch", batch_size=32, negatives=negatives,
                                random_state=0).fit_transform(city).to_numpy()

    with_extra = run(16)
    np.testing.assert_array_equal(with_extra, run(16))
    assert np.isfinite(with_extra).all() and not np.allclose(with_extra, run(0))


def test_one_batch_is_the_full_batch_step(city: Any) -> None:
    # With the whole city in one batch, the mini-batch losses and attention are the full-batch ones.
    full = HAFusionEmbedder(**SMALL, mode="full", random_state=0).fit(city)
    one = HAFusionEmbedder(**SMALL, mode="minibatch", batch_size=city.n_regions, random_state=0).fit(city)
    np.testing.assert_allclose(one.embedding_.to_numpy(), full.embedding_.to_numpy(), rtol=1e-4, atol=1e-5)
    assert one.log_.losses[0] == pytest.approx(full.log_.losses[0], rel=1e-4)
    several = HAFusionEmbedder(**SMALL, mode="minibatch", batch_size=30, random_state=0).fit(city)
    assert several.log_.steps_per_epoch == 3
    assert not np.allclose(several.embedding_.to_numpy(), full.embedding_.to_numpy())


def test_compact_batches_cover_every_region_once_and_move_with_the_seed() -> None:
    xy = np.random.default_rng(0).uniform(size=(1000, 2))
    fixed = compact_batches(xy, 128)
    assert sorted(np.concatenate(fixed).tolist()) == list(range(1000))
    assert max(map(len, fixed)) <= 128 and len(fixed) == 8
    # Batches are compact: a batch spans much less than the whole square.
    assert np.mean([np.ptp(xy[b], axis=0).max() for b in fixed]) < 0.7
    a = compact_batches(xy, 128, np.random.default_rng(1))
    b = compact_batches(xy, 128, np.random.default_rng(1))
    c = compact_batches(xy, 128, np.random.default_rng(2))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(map(tuple, (x.tolist() for x in a))) != sorted(map(tuple, (x.tolist() for x in c)))


def test_auto_mode_switches_at_the_threshold_and_reports_each_epoch(city: Any) -> None:
    epochs: list[tuple[int, int]] = []
    below = SRELEmbedder(**SMALL, batch_size=32, minibatch_above=city.n_regions, random_state=0)
    assert not below.uses_minibatch(city)
    above = SRELEmbedder(**SMALL, batch_size=32, minibatch_above=city.n_regions - 1, random_state=0)
    above.on_epoch = lambda epoch, total: epochs.append((epoch, total))
    above.fit(city)
    assert above.log_.steps_per_epoch == 3 and len(above.log_.epoch_seconds) == 2
    assert epochs == [(1, 2), (2, 2)]
    assert sorted(above.candidates_) == ["epoch 1", "epoch 2"]


def test_city_without_locations_takes_neighbours_from_trips(city: Any) -> None:
    bare = city.subset(city.region_ids)
    bare.regions = bare.regions.drop(columns=["lon", "lat"])
    assert not bare.has_locations
    embedder = SRELEmbedder(**SMALL, mode="minibatch", batch_size=32, k_neighbors=8, attention="sparse",
                            random_state=0).fit(bare)
    assert "trip partners" in embedder.prior_source_
    assert np.isfinite(embedder.embedding_.to_numpy()).all()


@pytest.mark.parametrize("cls", [SRELEmbedder, HAFusionEmbedder])
def test_a_large_city_never_holds_an_n_by_n_matrix(cls: type) -> None:
    n = 3200  # above 3,000 the synthetic OD is sparse; N x N float64 would be 82 MB
    big = make_synthetic_city(n_regions=n, n_poi_categories=6, with_geometry=False, random_state=0)
    embedder = cls(d=8, n_heads=2, n_intra_layers=1, n_layers=1, epochs=1, feedforward=None, batch_size=256,
                   minibatch_above=1000, random_state=0)
    assert embedder.uses_minibatch(big)
    tracemalloc.start()
    try:
        with LargestTensor() as mode:
            embedder.fit(big)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert embedder.log_.steps_per_epoch >= n // 256
    assert mode.largest < n * n / 10, f"a tensor of {mode.largest} elements"
    # NumPy's peak (tracemalloc sees its buffers) stays under a quarter of one N x N float64 matrix.
    assert numpy_peak < n * n * 8 / 4, f"numpy peaked at {numpy_peak / 1e6:.0f} MB"


@pytest.mark.parametrize("params, match", [
    ({"mode": "fast"}, "mode must be one of auto, full, minibatch, got 'fast'"),
    ({"mode": "minibatch", "batch_size": 1}, "batch_size must be an integer of at least 2 regions, got 1"),
    ({"mode": "minibatch", "batch_size": 64.0}, "batch_size must be an integer"),
    ({"minibatch_above": -5}, "minibatch_above must be an integer >= 0 regions, got -5"),
    ({"mode": "minibatch", "negatives": -1}, "negatives must be an integer >= 0 regions.*, got -1"),
])
def test_bad_parameters_are_one_line_errors(city: Any, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ParameterError, match=match) as err:
        SRELEmbedder(**SMALL, **params).fit(city)
    assert "\n" not in str(err.value) and str(err.value).startswith("SRELEmbedder:")
    with pytest.raises(ValueError):  # scikit-learn's habit: a bad parameter is a ValueError too
        HAFusionEmbedder(**SMALL, **params).fit(city)


def test_methods_without_a_minibatch_mode_say_why(city: Any) -> None:
    with pytest.raises(MethodUnavailableError, match="MGFNEmbedder: no mini-batch mode: its inputs are dense"):
        MGFNEmbedder(d=16, epochs=1, mode="minibatch").fit(city)
    with pytest.raises(MethodUnavailableError, match="view_fusion='memory' has no mini-batch mode"):
        HAFusionEmbedder(**SMALL, view_fusion="memory", mode="minibatch").fit(city)


def test_isolated_and_empty_regions_train_without_nans() -> None:
    city = make_synthetic_city(n_regions=49, random_state=2)
    od = city.views["od_flows"]
    od.iloc[3, :] = 0  # a region nobody leaves and nobody visits
    od.iloc[:, 3] = 0
    city.views["od_target"].iloc[3, :] = 0
    city.views["od_target"].iloc[:, 3] = 0
    city.views["poi_counts"].iloc[5, :] = 0  # a region with no POIs
    for cls in (HAFusionEmbedder, SRELEmbedder):
        for objective in ("authors", "distribution"):
            emb = cls(**SMALL, mode="minibatch", batch_size=12, objective=objective,
                      random_state=0).fit_transform(city)
            assert np.isfinite(emb.to_numpy()).all(), (cls.__name__, objective)
