"""The learned multi-view embedders (MVURE, MGFN, HAFusion, SREL) and their shared layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.embedders.multiview.hafusion import HAFusionEmbedder
from urbanprofile.embedders.multiview.layers import RegionAttention, SpatialBias
from urbanprofile.embedders.multiview.mgfn import MGFNEmbedder
from urbanprofile.embedders.multiview.mvure import MVUREEmbedder
from urbanprofile.embedders.multiview.spatial_graph import spatial_prior
from urbanprofile.embedders.multiview.srel import SRELEmbedder
from urbanprofile.errors import TrainingError
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.methods import get_method

FAST = {"d": 32, "epochs": 40}


def with_patterns(city: CityData, n_patterns: int = 3) -> CityData:
    """Split the city's OD matrix into time patterns that sum to it (like NYC's mob_patterns)."""
    od = city.views["od_flows"].to_numpy()
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.ones(n_patterns), size=od.shape)  # (N, N, P)
    patterns = np.floor(od[..., None] * shares).transpose(2, 0, 1)
    patterns[0] += od - patterns.sum(0)
    ids = city.region_ids
    columns = pd.MultiIndex.from_product([range(n_patterns), ids], names=["pattern", "destination"])
    city.views["od_patterns"] = pd.DataFrame(patterns.transpose(1, 0, 2).reshape(len(ids), -1), index=ids,
                                             columns=columns)
    return city.validate()


@pytest.mark.parametrize("cls", [MVUREEmbedder, HAFusionEmbedder, SRELEmbedder, MGFNEmbedder])
def test_embedders_fit_seeded_and_finite(city: CityData, cls: type) -> None:
    city = with_patterns(city)
    params = FAST if cls is not MVUREEmbedder else {**FAST, "k_neighbors": 5}
    a = cls(**params, random_state=0).fit_transform(city)
    b = cls(**params, random_state=0).fit_transform(city)
    c = cls(**params, random_state=1).fit_transform(city)
    assert a.shape == (city.n_regions, 32) and a.index.equals(city.region_ids)
    assert np.isfinite(a.to_numpy()).all()
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())


def test_training_lowers_the_loss(city: CityData) -> None:
    model = SRELEmbedder(d=32, epochs=60, random_state=0).fit(city)
    first, last = model.log_.losses[0], model.log_.losses[-1]
    assert last["mobility"] < first["mobility"] and last["poi"] < first["poi"]


def test_checkpoints_are_candidates_chosen_inside_training_folds(city: CityData) -> None:
    model = HAFusionEmbedder(**FAST, random_state=0).fit(city)
    assert set(model.candidates_) == {f"epoch {e}" for e in (8, 16, 24, 32, 40)}
    pd.testing.assert_frame_equal(model.candidates_["epoch 40"], model.transform(city))
    nested = evaluate_embedding(city, model.transform(city), "crime", "nested", candidates=model.candidates_)
    assert all(c["candidate"] in model.candidates_ for c in nested.chosen)
    paper = evaluate_embedding(city, model.transform(city), "crime", "paper", candidates=model.candidates_)
    assert all("candidate" not in c for c in paper.chosen)  # the paper protocol uses the final epoch


def test_sparse_attention_equals_dense_when_k_is_n() -> None:
    torch.manual_seed(0)
    n, d = 12, 16
    attention = RegionAttention(d, n_heads=4).eval()
    bias = SpatialBias(4, 16, weight=0.3)
    h = torch.randn(n, d)
    adjacency = torch.rand(n, n)
    buckets = torch.randint(0, 16, (n, n))
    # Every region "neighbours" every region, in a shuffled order per row.
    order = torch.stack([torch.randperm(n) for _ in range(n)])
    dense = attention(h, None, bias(adjacency, buckets))
    sparse = attention(h, order, bias(torch.gather(adjacency, 1, order), torch.gather(buckets, 1, order)))
    torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-5)


def test_sparse_mode_is_chosen_above_the_threshold() -> None:
    city = make_synthetic_city(n_regions=150, random_state=0)
    model = SRELEmbedder(d=16, epochs=5, dense_limit=100, k_neighbors=8, random_state=0).fit(city)
    assert "sparse" in model.prior_source_ and model.network_.neighbors.shape == (150, 8)
    assert np.isfinite(model.transform(city).to_numpy()).all()
    dense = SRELEmbedder(d=16, epochs=5, dense_limit=1000, random_state=0).fit(city)
    assert dense.network_.neighbors is None


def test_spatial_prior_uses_borders_and_falls_back_without_locations(city: CityData) -> None:
    prior = spatial_prior(city)
    assert prior.adjacency.shape == (city.n_regions, city.n_regions)
    assert "shared-border hops" in prior.source and prior.centrality.max() == pytest.approx(1.0)
    blind = CityData(city.name, city.regions.drop(columns=["lon", "lat"]), city.views, city.targets)
    with pytest.warns(UserWarning, match="mobility-derived proximity"):
        fallback = spatial_prior(blind)
    assert "mobility" in fallback.source and np.isfinite(fallback.adjacency).all()


def test_degenerate_graphs_train_without_nans() -> None:
    city = make_synthetic_city(n_regions=49, random_state=2)
    od = city.views["od_flows"]
    od.iloc[3, :] = 0  # a region nobody leaves
    od.iloc[:, 3] = 0  # ... and nobody visits: an isolated region in the mobility graph
    city.views["poi_counts"].iloc[5, :] = 0  # a region with no POIs
    city.views["poi_similarity"].iloc[5, :] = 0
    city.views["poi_similarity"].iloc[:, 5] = 0
    city.neighbors[7] = []  # no shared border
    for neighbours in city.neighbors.values():
        if 7 in neighbours:
            neighbours.remove(7)
    for cls in (MVUREEmbedder, HAFusionEmbedder, SRELEmbedder):
        params = FAST if cls is not MVUREEmbedder else {**FAST, "k_neighbors": 5}
        emb = cls(**params, random_state=0).fit_transform(city.validate())
        assert np.isfinite(emb.to_numpy()).all(), cls.__name__


def test_nan_loss_stops_with_a_one_line_error_naming_epoch_and_view(city: CityData) -> None:
    with pytest.raises(TrainingError, match=r"the poi loss became nan at epoch 1") as info:
        SRELEmbedder(d=16, epochs=5, random_state=0).fit(_nan_similarity(city))
    assert "\n" not in str(info.value)


def _nan_similarity(city: CityData) -> CityData:
    # validate() refuses NaN views, so the NaN enters behind validation, as a corrupt in-memory array would.
    city.views["poi_similarity"].iloc[0, 1] = np.nan
    return city


def test_registry_lists_the_learned_methods() -> None:
    for name in ("mvure", "mgfn", "hafusion", "srel"):
        spec = get_method(name)
        assert spec.stochastic
    assert get_method("mgfn").requires_views == ("od_flows", "od_patterns")


def test_large_city_path_never_densifies_the_od_matrix() -> None:
    city = make_synthetic_city(n_regions=300, with_geometry=False, sparse_od=True, random_state=0)
    od = city.views["od_flows"]
    assert all(isinstance(dtype, pd.SparseDtype) for dtype in od.dtypes)
    assert "poi_similarity" not in city.views  # similarity targets come from counts in sparse mode
    model = SRELEmbedder(d=16, epochs=5, attention="sparse", k_neighbors=8, random_state=0).fit(city)
    assert model.transform(city).shape == (300, 16)
    assert np.isfinite(model.transform(city).to_numpy()).all()


def test_sparse_view_validation_names_the_region() -> None:
    from urbanprofile.errors import DataError

    city = make_synthetic_city(n_regions=100, with_geometry=False, sparse_od=True, random_state=0)
    dense = city.views["od_flows"].sparse.to_dense()
    dense.iloc[7, 3] = -2
    city.views["od_flows"] = dense.astype(pd.SparseDtype(float, 0.0))
    with pytest.raises(DataError, match=r"negative counts \(region 7\)"):
        city.validate()


def test_on_epoch_reports_every_epoch(city: CityData) -> None:
    seen: list[tuple[int, int]] = []
    model = HAFusionEmbedder(d=16, epochs=7, random_state=0)
    model.on_epoch = lambda epoch, total: seen.append((epoch, total))
    model.fit(city)
    assert seen == [(e, 7) for e in range(1, 8)]
