"""Mini-batches with a halo: the seeds' full-batch outputs, the full-batch step over an accumulated epoch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch_helpers import LargestTensor

from urbanprofile.data.loaders.synthetic import make_synthetic_city
from urbanprofile.embedders.multiview.halo import Halo, HaloForward, HaloObjective
from urbanprofile.embedders.multiview.minibatch import (
    BatchMaker,
    batch_coordinates,
    compact_batches,
    minibatch_inputs,
)
from urbanprofile.embedders.multiview.mvure import MVUREEmbedder
from urbanprofile.embedders.multiview.srel import SRELEmbedder
from urbanprofile.embedders.multiview.training import MultiTaskObjective, multitask_step
from urbanprofile.errors import ParameterError

SMALL = {"d": 16, "n_heads": 2, "feedforward": None, "dropout": 0.0, "k_neighbors": 6}


@pytest.fixture(scope="module")
def city() -> Any:
    return make_synthetic_city(n_regions=90, n_poi_categories=8, random_state=0)


@pytest.mark.parametrize("embedder", [
    SRELEmbedder(**SMALL, attention="sparse", random_state=0),
    MVUREEmbedder(d=16, n_heads=2, n_layers=2, k_neighbors=4, dropout=0.0, random_state=0),
], ids=["srel", "mvure"])
def test_the_halo_gives_a_batch_its_full_batch_outputs(embedder: Any) -> None:
    big = make_synthetic_city(n_regions=400, n_poi_categories=6, random_state=1)
    inputs = minibatch_inputs(big, embedder.required_views)
    torch.manual_seed(0)
    network, neighbors = embedder.build_minibatch(big, inputs)
    network.eval()
    fusion = network.views.fusion if hasattr(network, "views") else network.fusion
    with torch.no_grad():
        full = network()
        pooled = fusion.row_scores.mean(dim=0)
        seeds = compact_batches(batch_coordinates(big, inputs), 50)[0]
        make = BatchMaker(big.n_regions, neighbors)
        forward = HaloForward(network, big.n_regions, neighbors)
        nodes = forward.halo.nodes(seeds)
        assert len(nodes) < big.n_regions * 0.75  # the halo is a neighbourhood, not the city
        # Every layer on the whole halo, or each ring only as far as the next layer reads it: the same outputs.
        batch = network(make(nodes), pooled=pooled)[: len(seeds)]
        np.testing.assert_allclose(batch.numpy(), full[seeds].numpy(), rtol=1e-5, atol=1e-5)
        rings = network(forward.batch(nodes), pooled=pooled)
        assert len(rings) == len(seeds) and forward.halo.rings[-1] == len(nodes)
        np.testing.assert_allclose(rings.numpy(), full[seeds].numpy(), rtol=1e-5, atol=1e-5)
        # One hop short, the border seeds see fewer neighbours than in full batch.
        short = Halo(big.n_regions, neighbors, network.hops - 1).nodes(seeds)
        error = np.abs(network(make(short), pooled=pooled)[: len(seeds)].numpy() - full[seeds].numpy()).max()
        assert error > 20 * np.abs(batch.numpy() - full[seeds].numpy()).max() and error > 1e-5
        # The whole-city embedding, batch by batch, is the full-batch one.
        every = forward.embed_all(compact_batches(batch_coordinates(big, inputs), 50))
        np.testing.assert_allclose(every, full.numpy(), rtol=1e-5, atol=1e-5)


def _full_batch_steps(embedder: SRELEmbedder, city: Any,
                     steps: int) -> tuple[torch.nn.Module, list[float], list[np.ndarray]]:
    """The full-batch Adam steps of the network that the mini-batch fit starts from (same seed, same prior)."""
    torch.manual_seed(embedder.random_state or 0)
    inputs = minibatch_inputs(city, embedder.required_views)
    network, _ = embedder.build_minibatch(city, inputs)
    objective = MultiTaskObjective(inputs, views=inputs.similarity_views, objective=embedder.objective)
    step = multitask_step(network, network.heads, objective)
    optimizer = torch.optim.Adam(network.parameters(), lr=embedder.lr, weight_decay=embedder.weight_decay)
    losses = []
    # Elements with a gradient that is numerically zero (the attention's key biases: a softmax ignores them) are
    # rounding noise that Adam scales up to a full step; they are left out of the weight comparison.
    material = [np.ones(p.shape, dtype=bool) for p in network.parameters()]
    for _ in range(steps):
        optimizer.zero_grad()
        parts = step()
        total = sum(parts.values())
        total.backward()
        for keep, parameter in zip(material, network.parameters(), strict=True):
            if parameter.grad is not None:
                keep &= parameter.grad.abs().numpy() > 1e-6
        optimizer.step()
        losses.append(float(total.detach()))
    return network, losses, material


@pytest.mark.parametrize("attention", ["sparse", "dense"])
@pytest.mark.parametrize("objective", ["authors", "distribution"])
def test_an_accumulated_epoch_is_the_full_batch_step(city: Any, attention: str, objective: str) -> None:
    params = {**SMALL, "attention": attention, "objective": objective, "epochs": 2, "batch_size": 32,
              "random_state": 3}
    if objective == "distribution":
        params["objective"] = {"base": "distribution", "clip": None}
    mini = SRELEmbedder(**params, mode="minibatch", negatives=city.n_regions, accumulate=True).fit(city)
    assert mini.log_.steps_per_epoch == 3
    reference, losses, material = _full_batch_steps(SRELEmbedder(**params), city, 2)
    # The logged epoch loss (summed over batches) is the full-batch loss; the last gradients and the weights
    # after two optimizer steps are the full-batch ones.
    assert [sum(epoch.values()) for epoch in mini.log_.losses] == pytest.approx(losses, rel=1e-5)
    compared = 0
    for (name, ours), theirs, keep in zip(mini.network_.named_parameters(), reference.parameters(), material,
                                          strict=True):
        np.testing.assert_allclose(ours.detach().numpy()[keep], theirs.detach().numpy()[keep], rtol=1e-5,
                                   atol=1e-5, err_msg=name)
        compared += int(keep.sum())
        if ours.grad is not None:
            scale = float(theirs.grad.abs().max()) + 1e-12
            np.testing.assert_allclose(ours.grad.numpy() / scale, theirs.grad.numpy() / scale, atol=1e-5,
                                       err_msg=name)
    assert compared > 0.9 * sum(p.numel() for p in reference.parameters())
    # A step per batch is another optimisation path (the fast one), still seeded.
    fast = SRELEmbedder(**params, mode="minibatch", negatives=city.n_regions).fit(city)
    assert not np.allclose(fast.embedding_.to_numpy(), mini.embedding_.to_numpy(), atol=1e-4)


def test_sampled_negatives_estimate_the_full_rows(city: Any) -> None:
    # The synthetic trips join most pairs; keep the strongest 5 % so that a batch's partners are not the city.
    city = city.subset(city.region_ids)
    for view in ("od_flows", "od_target"):
        frame = city.views[view]
        city.views[view] = frame.where(frame >= np.quantile(frame.to_numpy(), 0.95), 0.0)
    embedder = SRELEmbedder(**SMALL, objective={"epsilon": 0.0}, random_state=0)
    inputs = minibatch_inputs(city, embedder.required_views)
    torch.manual_seed(0)
    network, _ = embedder.build_minibatch(city, inputs)
    network.eval()
    objective = HaloObjective(inputs, inputs.similarity_views, embedder.objective)
    seeds = np.arange(10)
    rng = np.random.default_rng(0)
    everything, weights = objective.candidates(seeds, city.n_regions, rng)
    assert everything[:10].tolist() == seeds.tolist() and sorted(everything.tolist()) == list(range(90))
    assert np.all(weights == 1)
    fixed = len(objective.candidates(seeds, 0, rng)[0])
    drawn, weights = objective.candidates(seeds, 8, rng)
    assert len(drawn) == fixed + 8 and len(set(drawn.tolist())) == len(drawn)
    assert weights.sum() == pytest.approx(city.n_regions)
    with torch.no_grad():
        embedding = network()
        exact = objective.parts(10, everything, np.ones(90), embedding[everything], network.heads)
        sampled = [objective.parts(10, t, w, embedding[t], network.heads)
                   for t, w in (objective.candidates(seeds, 8, rng) for _ in range(300))]
    # The similarity sums are unbiased; the softmax normaliser is, its log nearly so.
    for view in inputs.similarity_views:
        mean = np.mean([float(s[view]) for s in sampled])
        assert mean == pytest.approx(float(exact[view]), rel=0.05)
    assert np.mean([float(s["mobility"]) for s in sampled]) == pytest.approx(float(exact["mobility"]), rel=0.1)


def test_fast_path_is_seeded_with_sparse_attention() -> None:
    big = make_synthetic_city(n_regions=400, n_poi_categories=6, random_state=1)

    def run(seed: int) -> np.ndarray:
        return SRELEmbedder(**SMALL, attention="sparse", epochs=1, mode="minibatch", batch_size=100, negatives=8,
                            random_state=seed).fit_transform(big).to_numpy()

    first = run(0)
    np.testing.assert_array_equal(first, run(0))
    assert not np.allclose(first, run(1)) and np.isfinite(first).all()


def test_accumulate_must_be_a_bool(city: Any) -> None:
    with pytest.raises(ParameterError, match="SRELEmbedder: accumulate must be True or False, got 'yes'") as err:
        SRELEmbedder(**SMALL, epochs=1, mode="minibatch", accumulate="yes").fit(city)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_mvure_accumulated_epoch_is_its_full_batch_step(city: Any) -> None:
    params = {"d": 16, "n_heads": 2, "n_layers": 2, "k_neighbors": 5, "dropout": 0.0, "epochs": 2,
              "random_state": 1, "objective": {"base": "distribution", "clip": None}}
    mini = MVUREEmbedder(**params, mode="minibatch", batch_size=32, negatives=city.n_regions,
                         accumulate=True).fit(city)
    # The reference is MVURE's own full-batch code path (build and its step), same seed.
    reference = MVUREEmbedder(**params)
    torch.manual_seed(1)
    network, step = reference.build(city, reference.inputs(city))
    optimizer = torch.optim.Adam(network.parameters(), lr=reference.lr, weight_decay=reference.weight_decay)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        total = sum(step().values())
        total.backward()
        optimizer.step()
        losses.append(float(total.detach()))
    assert [sum(epoch.values()) for epoch in mini.log_.losses] == pytest.approx(losses, rel=1e-5)
    for (name, ours), theirs in zip(mini.network_.named_parameters(), network.parameters(), strict=True):
        scale = float(theirs.grad.abs().max()) + 1e-12
        np.testing.assert_allclose(ours.grad.numpy() / scale, theirs.grad.numpy() / scale, atol=1e-5, err_msg=name)
        keep = theirs.grad.abs().numpy() > 1e-6  # see _full_batch_steps: Adam scales rounding noise up
        np.testing.assert_allclose(ours.detach().numpy()[keep], theirs.detach().numpy()[keep], rtol=1e-5,
                                   atol=1e-5, err_msg=name)


def test_mvure_on_a_large_city_never_holds_an_n_by_n_tensor() -> None:
    n = 3200  # above 3,000 the synthetic OD is sparse and the inputs are the sparse ones
    big = make_synthetic_city(n_regions=n, n_poi_categories=6, with_geometry=False, random_state=0)
    embedder = MVUREEmbedder(d=8, n_heads=2, n_layers=1, epochs=1, mode="minibatch", batch_size=256, random_state=0)
    with LargestTensor() as mode:
        embedder.fit(big)
    assert mode.largest < n * n / 10, f"a tensor of {mode.largest} elements"
    assert np.isfinite(embedder.embedding_.to_numpy()).all()
