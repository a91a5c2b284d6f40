"""Halo mini-batches on a small city: every region outside a batch's partners a candidate, the loss rows exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from urbanprofile.data.loaders.synthetic import make_synthetic_city
from urbanprofile.embedders.multiview import halo
from urbanprofile.embedders.multiview.hafusion import HAFusionEmbedder
from urbanprofile.embedders.multiview.halo import AUTO_NEGATIVES, EXACT_REST, HaloObjective, negatives_to_draw
from urbanprofile.embedders.multiview.minibatch import batch_coordinates, compact_batches, minibatch_inputs
from urbanprofile.embedders.multiview.mvure import MVUREEmbedder
from urbanprofile.embedders.multiview.srel import SRELEmbedder
from urbanprofile.embedders.multiview.training import MultiTaskObjective, multitask_step
from urbanprofile.errors import ParameterError

SMALL = {"d": 16, "n_heads": 2, "feedforward": None, "dropout": 0.0, "k_neighbors": 6}


@pytest.fixture(scope="module")
def city() -> Any:
    """90 regions whose trips are thinned to the strongest 5 %, so a batch's trip partners are not the whole city."""
    city = make_synthetic_city(n_regions=90, n_poi_categories=8, random_state=0)
    city = city.subset(city.region_ids)
    for view in ("od_flows", "od_target"):
        frame = city.views[view]
        city.views[view] = frame.where(frame >= np.quantile(frame.to_numpy(), 0.95), 0.0)
    return city


def _setting(city: Any, objective: Any) -> tuple[Any, HaloObjective, list[np.ndarray], Any]:
    embedder = SRELEmbedder(**SMALL, objective=objective, random_state=0)
    inputs = minibatch_inputs(city, embedder.required_views)
    torch.manual_seed(0)
    network, _ = embedder.build_minibatch(city, inputs)
    network.eval()
    batches = compact_batches(batch_coordinates(city, inputs), 16)
    full = multitask_step(network, network.heads,
                          MultiTaskObjective(inputs, views=inputs.similarity_views, objective=objective))
    return network, HaloObjective(inputs, inputs.similarity_views, objective), batches, full


@pytest.mark.parametrize("objective", ["authors", {"base": "distribution", "clip": None}],
                         ids=["authors", "distribution"])
def test_auto_batches_are_the_full_batch_loss_rows(city: Any, objective: Any) -> None:
    network, halo_objective, batches, full = _setting(city, objective)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        embedding = network()
        total: dict[str, float] = {}
        outside = []
        for seeds in batches:
            fixed = len(halo_objective.candidates(seeds, 0, rng)[0])
            outside.append(city.n_regions - fixed)
            targets, weights = halo_objective.candidates(seeds, "auto", rng)
            # Every region of the city is a candidate, each standing for itself: nothing is sampled.
            assert sorted(targets.tolist()) == list(range(city.n_regions)) and np.all(weights == 1)
            parts = halo_objective.parts(len(seeds), targets, weights, embedding[targets], network.heads)
            for part, value in parts.items():
                total[part] = total.get(part, 0.0) + float(value)
        reference = {part: float(value) for part, value in full().items()}
    # The case under test: batches with regions outside their partners, more than "auto"'s sample would draw.
    assert min(outside) > AUTO_NEGATIVES
    # The batches' rows add up to the full-batch loss, part by part.
    assert total.keys() == reference.keys()
    for part, value in reference.items():
        assert total[part] == pytest.approx(value, rel=1e-5), part


def test_a_batch_of_sampled_negatives_is_not_its_exact_rows(city: Any) -> None:
    network, halo_objective, batches, _ = _setting(city, "authors")
    seeds, rng = batches[0], np.random.default_rng(0)
    with torch.no_grad():
        embedding = network()
        losses = {}
        for negatives in ("auto", 8):
            targets, weights = halo_objective.candidates(seeds, negatives, rng)
            parts = halo_objective.parts(len(seeds), targets, weights, embedding[targets], network.heads)
            losses[negatives] = float(sum(parts.values()))
    # An explicit count wins over "auto" and its loss has a sampling error (which the exact rule removes).
    assert losses[8] != pytest.approx(losses["auto"], rel=1e-4)


def test_the_rule_switches_at_the_bound() -> None:
    assert negatives_to_draw("auto", EXACT_REST) == EXACT_REST
    assert negatives_to_draw("auto", EXACT_REST + 1) == AUTO_NEGATIVES
    assert negatives_to_draw("auto", 0) == 0
    assert negatives_to_draw("all", 10 * EXACT_REST) == 10 * EXACT_REST
    assert negatives_to_draw(8, 100) == 8 and negatives_to_draw(8, 5) == 5 and negatives_to_draw(0, 100) == 0


def test_candidates_switch_at_the_bound(city: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, halo_objective, batches, _ = _setting(city, "authors")
    seeds = batches[0]
    rest = city.n_regions - len(halo_objective.candidates(seeds, 0, np.random.default_rng(0))[0])
    assert rest > AUTO_NEGATIVES
    monkeypatch.setattr(halo, "EXACT_REST", rest)
    targets, weights = halo_objective.candidates(seeds, "auto", np.random.default_rng(0))
    assert len(targets) == city.n_regions and np.all(weights == 1)
    monkeypatch.setattr(halo, "EXACT_REST", rest - 1)
    targets, weights = halo_objective.candidates(seeds, "auto", np.random.default_rng(0))
    assert len(targets) == city.n_regions - rest + AUTO_NEGATIVES and len(set(targets.tolist())) == len(targets)
    assert weights.max() == pytest.approx(rest / AUTO_NEGATIVES) and weights.sum() == pytest.approx(city.n_regions)
    # "all" keeps every region past the bound.
    targets, weights = halo_objective.candidates(seeds, "all", np.random.default_rng(0))
    assert len(targets) == city.n_regions and np.all(weights == 1)


def test_auto_is_the_default_and_on_a_small_city_the_fit_of_all(city: Any) -> None:
    assert SRELEmbedder().negatives == "auto" and MVUREEmbedder().negatives == "auto"
    params = {**SMALL, "epochs": 2, "mode": "minibatch", "batch_size": 16, "random_state": 0}
    auto = SRELEmbedder(**params).fit(city).embedding_.to_numpy()
    np.testing.assert_array_equal(auto, SRELEmbedder(**params, negatives="all").fit(city).embedding_.to_numpy())
    assert not np.allclose(auto, SRELEmbedder(**params, negatives=8).fit(city).embedding_.to_numpy(), atol=1e-5)


@pytest.mark.parametrize(("embedder", "message"), [
    (SRELEmbedder(**SMALL, epochs=1, mode="minibatch", negatives="most"),
     "SRELEmbedder: negatives must be an integer >= 0 regions or 'auto' or 'all', got 'most'"),
    (HAFusionEmbedder(d=16, epochs=1, mode="minibatch", negatives="auto"),
     "HAFusionEmbedder: negatives must be an integer >= 0 regions, got 'auto'"),
], ids=["srel", "hafusion"])
def test_a_bad_negatives_is_a_one_line_error(city: Any, embedder: Any, message: str) -> None:
    with pytest.raises(ParameterError) as err:
        embedder.fit(city)
    assert str(err.value) == message
