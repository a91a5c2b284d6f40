"""Fidelity to the authors' code (objective, read-out) and learned + raw probing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from urbanprofile.benchmark.runner import BenchmarkPlan, plan_units
from urbanprofile.data import CityData
from urbanprofile.embedders.multiview.hafusion import HAFusionEmbedder
from urbanprofile.embedders.multiview.inputs import MultiViewInputs, objective_settings
from urbanprofile.embedders.multiview.layers import (
    AttentionEdges,
    MemoryViewFusion,
    RegionAttention,
    RegionBlock,
    feed_forward,
    readout,
)
from urbanprofile.embedders.multiview.srel import SRELEmbedder
from urbanprofile.embedders.multiview.training import MultiTaskObjective
from urbanprofile.errors import MethodUnavailableError
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.heads.probes import BlockRidgeProbe, RidgeProbe, make_probe
from urbanprofile.methods import get_method


def _log_softmax_np(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _mobility(city: CityData, objective: str | dict, seed: int = 0) -> tuple[float, np.ndarray, np.ndarray]:
    inputs = MultiViewInputs.from_city(city)
    rng = np.random.default_rng(seed)
    s, d = rng.normal(size=(city.n_regions, 8)), rng.normal(size=(city.n_regions, 8))
    loss = MultiTaskObjective(inputs, objective=objective).mobility(torch.tensor(s, dtype=torch.float32),
                                                                     torch.tensor(d, dtype=torch.float32))
    return float(loss), s, d


def test_authors_objective_is_the_volume_weighted_sum_over_all_pairs(city: CityData) -> None:
    target = city.views["od_flows"].to_numpy(dtype=float).copy()
    target[0, 1] += 500.0  # od_target differs from od_flows: the objective must read od_target
    city.views["od_target"] = pd.DataFrame(target, index=city.region_ids, columns=city.region_ids)
    loss, s, d = _mobility(city, "authors")
    m = target / target.mean()
    logits = s @ d.T
    p_dest = np.exp(_log_softmax_np(logits, 1))
    p_orig = np.exp(_log_softmax_np(logits.T, 1))
    expected = -(m * np.log(p_dest + 1e-4)).sum() - (m.T * np.log(p_orig + 1e-4)).sum()
    assert loss == pytest.approx(expected, rel=1e-4)
    flows_loss, _, _ = _mobility(city, {"target": "od_flows"})
    assert flows_loss != pytest.approx(loss, rel=1e-4)


def test_distribution_objective_is_the_mean_per_row_cross_entropy(city: CityData) -> None:
    loss, s, d = _mobility(city, "distribution")
    od = city.views["od_flows"].to_numpy(dtype=float)
    logits = s @ d.T
    out = od / od.sum(axis=1, keepdims=True)
    inn = od / od.sum(axis=0, keepdims=True)
    expected = -(out * _log_softmax_np(logits, 1)).sum(1).mean() - (inn * _log_softmax_np(logits, 0)).sum(0).mean()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_objective_settings_validate_names_and_values() -> None:
    assert objective_settings({"epsilon": 0.0})["weighting"] == "volume"
    assert objective_settings({"base": "distribution", "similarity": "cosine"})["weighting"] == "row"
    for bad in ("nope", {"weighting": "nope"}, {"epsilon": 2.0}, {"lr": 1}, {"similarity_weight": -1.0}):
        with pytest.raises(ValueError):
            objective_settings(bad)


def test_cosine_similarity_part_ignores_the_embedding_scale(city: CityData) -> None:
    objective = MultiTaskObjective(MultiViewInputs.from_city(city))
    e = torch.randn(city.n_regions, 8)
    assert float(objective.similarity_loss("poi", e)) == pytest.approx(float(objective.similarity_loss("poi", 5 * e)),
                                                                        rel=1e-4)


def test_similarity_weight_scales_the_similarity_parts(city: CityData) -> None:
    inputs, e = MultiViewInputs.from_city(city), torch.randn(city.n_regions, 8)
    plain = float(MultiTaskObjective(inputs).similarity_loss("poi", e))
    weighted = float(MultiTaskObjective(inputs, objective={"similarity_weight": 10.0}).similarity_loss("poi", e))
    assert plain > 0 and weighted == pytest.approx(10 * plain, rel=1e-5)
    assert float(MultiTaskObjective(inputs, objective={"similarity_weight": 0.0}).similarity_loss("poi", e)) == 0.0


def test_deepfc_readout_ends_in_leaky_relu_and_names_are_checked() -> None:
    out = readout("deepfc", 8, 4)(torch.randn(50, 8))
    negative = out[out < 0]
    assert out.shape == (50, 4) and len(negative) > 0
    with pytest.raises(ValueError, match="unknown readout"):
        readout("nope", 8, 4)


def test_hafusion_feed_forward_option_gives_the_authors_relu_blocks(city: CityData) -> None:
    def hidden_layers(model: HAFusionEmbedder | SRELEmbedder) -> set[tuple[int, str]]:
        found = set()
        for module in model.network_.modules():
            if isinstance(module, RegionBlock):
                found.add((module.ffn[0].out_features, type(module.ffn[1]).__name__))
        return found

    authors = HAFusionEmbedder(d=16, epochs=2, feedforward=64, random_state=0).fit(city)
    previous = HAFusionEmbedder(d=16, epochs=2, feedforward=None, random_state=0).fit(city)
    assert hidden_layers(authors) == {(64, "ReLU")}  # intra-view and inter-region blocks alike
    assert hidden_layers(previous) == {(32, "GELU")}
    assert HAFusionEmbedder().feedforward == 2048  # the authors' width is the default
    srel = SRELEmbedder(d=16, epochs=2, feedforward=64, random_state=0).fit(city)
    assert hidden_layers(srel) == {(64, "ReLU")} and SRELEmbedder().feedforward is None  # an option for srel
    with pytest.raises(ValueError, match="feedforward"):
        feed_forward(16, feedforward=0)


def test_hafusion_trains_with_each_objective(city: CityData) -> None:
    for objective in ("authors", "distribution"):
        model = HAFusionEmbedder(d=16, epochs=8, objective=objective, random_state=0).fit(city)
        assert np.isfinite(model.transform(city).to_numpy()).all()
        assert model.log_.losses[-1]["mobility"] < model.log_.losses[0]["mobility"]


def test_attention_edge_path_pools_each_row_by_a_softmax_of_its_own_edge_values() -> None:
    torch.manual_seed(0)
    edges = AttentionEdges(channels=3, d=5)
    weights = torch.softmax(torch.randn(7, 7), dim=1)
    w, b = edges.expand.weight[:, 0].detach().numpy(), edges.expand.bias.detach().numpy()
    a = weights.numpy()
    e = a[:, :, None] * w + b  # (7, 7, 3): one value per entry and channel
    pooled = (np.exp(e) / np.exp(e).sum(axis=1, keepdims=True) * e).sum(axis=1)
    expected = pooled @ edges.project.weight.detach().numpy().T + edges.project.bias.detach().numpy()
    np.testing.assert_allclose(edges(weights).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    h = torch.randn(7, 8)
    plain, with_edges = RegionAttention(8, 2), RegionAttention(8, 2, edge_channels=3)
    with_edges.load_state_dict(plain.state_dict(), strict=False)  # the same attention, plus the edge path
    assert not torch.allclose(plain(h), with_edges(h))
    neighbors = torch.tensor([[(i + j) % 7 for j in range(3)] for i in range(7)])
    assert with_edges(h, neighbors).shape == (7, 8)  # k-nearest attention pools over the k neighbours
    with pytest.raises(ValueError, match="edge_channels"):
        AttentionEdges(0, 5)


def test_hafusion_edge_path_option_sits_in_the_intra_view_blocks_only(city: CityData) -> None:
    kwargs = {"d": 16, "epochs": 3, "feedforward": 32, "n_intra_layers": 1, "n_layers": 2}
    model = HAFusionEmbedder(**kwargs, edge_channels=4, random_state=0).fit(city)
    again = HAFusionEmbedder(**kwargs, edge_channels=4, random_state=0).fit(city)
    emb = model.transform(city)
    assert emb.shape == (city.n_regions, 16) and np.isfinite(emb.to_numpy()).all()
    np.testing.assert_array_equal(emb.to_numpy(), again.transform(city).to_numpy())  # deterministic per seed
    paths = [m for m in model.network_.modules() if isinstance(m, AttentionEdges)]
    assert len(paths) == 3 and all(p.expand.out_features == 4 for p in paths)  # one per view, none after fusion
    assert all(block.attention.edges is None for block in model.network_.blocks)
    assert HAFusionEmbedder().edge_channels is None  # default unchanged
    with pytest.raises(ValueError, match="edge_channels"):
        HAFusionEmbedder(**kwargs, edge_channels=0).fit(city)


def test_memory_view_fusion_mixes_memory_and_views_then_weighs_views_by_column_scores() -> None:
    torch.manual_seed(0)
    fusion = MemoryViewFusion(d=6, n_regions=10, n_blocks=2, memory=4, score_width=5)
    views = [torch.randn(10, 6) for _ in range(3)]
    with torch.no_grad():
        fusion.mix.copy_(torch.tensor([0.0, 1.0]))  # the input views alone: no memory path
    out = fusion(views)
    assert out.shape == (10, 6)
    weights = fusion.view_weights
    assert weights.shape == (3,) and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out.detach().numpy(), sum(float(weights[v]) * views[v] for v in range(3)).numpy(),
                               rtol=1e-5, atol=1e-6)
    # the view scores by hand: per coordinate f, each view's column over regions projected, then
    # mean over f and over the other view u of LeakyReLU(own(v) + other(u))
    cols = torch.stack([torch.stack([fusion.columns(views[v][:, f]) for v in range(3)]) for f in range(6)])
    own, other = fusion.score_self(cols)[..., 0], fusion.score_other(cols)[..., 0]  # (6, 3) each
    scores = torch.nn.functional.leaky_relu(own[:, :, None] + other[:, None, :], 0.3).mean(dim=(0, 2))
    np.testing.assert_allclose(weights.numpy(), torch.softmax(scores, 0).detach().numpy(), rtol=1e-5)
    # near-zero memory weights (std 1e-3): the memory path starts almost the same for every region
    with torch.no_grad():
        m = torch.stack(views, dim=1)
        for key, value in zip(fusion.keys, fusion.values, strict=True):
            a = torch.softmax(key(m), dim=1)
            m = value(a / a.sum(dim=2, keepdim=True))
    assert float(m.std(dim=0).max()) < 1e-3
    with pytest.raises(ValueError, match="memory fusion"):
        MemoryViewFusion(6, 10, n_blocks=0)


def test_hafusion_memory_fusion_option_trains_and_is_deterministic(city: CityData) -> None:
    kwargs = {"d": 16, "epochs": 3, "feedforward": 32, "view_fusion": "memory", "memory_blocks": 2,
              "memory_size": 8}
    model = HAFusionEmbedder(**kwargs, random_state=0).fit(city)
    emb = model.transform(city)
    assert emb.shape == (city.n_regions, 16) and np.isfinite(emb.to_numpy()).all()
    np.testing.assert_array_equal(emb.to_numpy(),
                                  HAFusionEmbedder(**kwargs, random_state=0).fit(city).transform(city).to_numpy())
    fusion = model.network_.views.fusion
    assert isinstance(fusion, MemoryViewFusion) and len(fusion.keys) == 2
    assert float(fusion.view_weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert HAFusionEmbedder().view_fusion == "attention"  # default unchanged
    with pytest.raises(ValueError, match="view_fusion"):
        HAFusionEmbedder(d=16, epochs=1, view_fusion="nope").fit(city)


def _blocks(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    learned = rng.normal(size=(n, 6))
    raw = rng.poisson(5, size=(n, 10)).astype(float)
    return learned, raw, rng.normal(0, 0.1, n)


def test_block_probe_weighs_the_informative_block() -> None:
    learned, raw, noise = _blocks()
    y_learned = 20 + 3 * learned[:, 0] + noise  # only the learned block matters
    probe = BlockRidgeProbe(n_learned=6).fit(np.hstack([learned, raw]), y_learned)
    assert probe.chosen()["block_weight"] >= 2.0
    y_raw = 5 + raw[:, 0] + raw[:, 3] + noise  # only the raw counts matter
    probe = BlockRidgeProbe(n_learned=6).fit(np.hstack([learned, raw]), y_raw)
    assert probe.chosen()["block_weight"] <= 0.5


def test_block_probe_with_the_learned_block_alone_is_a_scaled_ridge() -> None:
    learned, raw, noise = _blocks()
    y = 20 + 3 * learned[:, 0] + noise
    X = np.hstack([learned, raw])
    probe = BlockRidgeProbe(n_learned=6, block_weights=(float("inf"),), log_features=(False,),
                            log_target=(False,)).fit(X[:100], y[:100])
    plain = RidgeProbe(alphas=(probe.alpha_,), log_features=(False,), scale=(True,), log_target=(False,))
    plain.fit(learned[:100], y[:100])
    plain.capped_ = True
    np.testing.assert_allclose(probe.predict(X[100:]), plain.predict(learned[100:]), rtol=1e-8)
    with pytest.raises(ValueError, match="n_learned"):
        BlockRidgeProbe(n_learned=16).fit(X, y)
    with pytest.raises(MethodUnavailableError, match="paper"):
        make_probe("ridge-blocks", True, n_learned=6)


def test_learned_plus_raw_method_keeps_both_blocks_and_its_checkpoints(city: CityData) -> None:
    spec = get_method("hafusion+raw")
    embedder = spec.build(random_state=0)
    embedder.learned_params = {"d": 16, "epochs": 10}  # a tiny model
    emb = embedder.fit(city).transform(city)
    n_raw = 2 * city.n_regions + city.views["poi_counts"].shape[1] + city.views["landuse_counts"].shape[1]
    assert list(emb.columns[:16]) == [f"emb_{k}" for k in range(16)] and emb.shape[1] == 16 + n_raw
    assert all(frame.columns.equals(emb.columns) for frame in embedder.candidates_.values())
    two = dict(list(embedder.candidates_.items())[-2:])
    nested = evaluate_embedding(city, emb, "crime", "nested", head=spec.head, candidates=two)
    assert all("block_weight" in c and "candidate" in c for c in nested.chosen)
    with pytest.raises(MethodUnavailableError, match="paper"):
        evaluate_embedding(city, emb, "crime", "paper", head=spec.head)


def test_learned_plus_raw_has_no_paper_cell_because_unscaled_counts_drown_the_learned_block(city: CityData) -> None:
    """The peers' paper Ridge(alpha=1) on learned + unscaled raw columns is raw-all's paper fit: not a +raw figure."""
    rng = np.random.default_rng(0)
    raw = get_method("raw-all").build().fit(city).transform(city)
    learned = pd.DataFrame(rng.normal(size=(city.n_regions, 4)), index=city.region_ids,
                           columns=[f"emb_{k}" for k in range(4)])
    learned["emb_0"] = np.log1p(city.targets["crime"].reindex(city.region_ids).fillna(0).to_numpy())
    both = pd.concat([learned, raw.add_prefix("raw_")], axis=1)
    # What the paper cell used to be: the plain Ridge on the concatenation ignores an informative learned block.
    plain = {name: evaluate_embedding(city, frame, "crime", "paper", head="ridge").metrics["r2"]
             for name, frame in (("raw", raw), ("both", both))}
    assert plain["both"] == pytest.approx(plain["raw"], abs=0.05)
    assert evaluate_embedding(city, both, "crime", "nested", head="ridge-blocks").metrics["r2"] > plain["both"] + 0.1
    with pytest.raises(MethodUnavailableError):
        evaluate_embedding(city, both, "crime", "paper", head="ridge-blocks")
    # The runner leaves the cell out (with its reason) instead of training the embedder for it on every resume.
    plan = BenchmarkPlan(datasets=[city.name], methods=["raw-all", "srel+raw"], protocols=["paper", "nested"],
                         seeds=[0], tasks=["crime"])
    units, _, _, skipped, _ = plan_units(plan, cities={city.name: city})
    cells = {(u.spec.name, protocol) for u in units for _, protocol, _ in u.cells}
    assert cells == {("raw-all", "paper"), ("raw-all", "nested"), ("srel+raw", "nested")}
    assert any("srel+raw" in line and "paper" in line for line in skipped)
