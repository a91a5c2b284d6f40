"""Heads as an axis: names, the store migration, UrbanMoE, Prompt4RE, joint evaluation and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.benchmark.runner import BenchmarkPlan, run_benchmark
from urbanprofile.benchmark.store import ResultStore
from urbanprofile.data import CityData, make_synthetic_city
from urbanprofile.errors import DataError, MethodUnavailableError, UnknownNameError
from urbanprofile.heads.registry import embedding_blocks, parse_head

torch = pytest.importorskip("torch")


@pytest.fixture
def small_city() -> CityData:
    return make_synthetic_city(n_regions=40, n_poi_categories=8, random_state=1)


def test_head_names_parse_and_unknown_ones_list_the_valid_names() -> None:
    assert parse_head("prompt4re-llama").prompt_model == "llama"
    notask = parse_head("prompt4re-qwen-notask")
    assert notask.prompt_model == "qwen" and not notask.task_prompt and notask.align
    assert not parse_head("concat-smollm2").align
    assert parse_head("prompt4re-llama-notask-region").attention == "region"
    assert parse_head("prompt4re-local:/models/x").prompt_model == "local:/models/x"
    assert parse_head("moe").multitask and not parse_head("mlp").multitask
    with pytest.raises(UnknownNameError, match=r"unknown head 'prompt4re-gpt'.*valid: .*concat-llama"):
        parse_head("prompt4re-gpt")
    assert embedding_blocks(["poi__0", "poi__1", "location__0"]) == (("poi", "location"), (2, 1))
    assert embedding_blocks(["emb_0", "emb_1"]) == (("embedding",), (2,))


def test_an_older_store_opens_and_keeps_every_row(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))  # the schema before heads were an axis
    con.execute("CREATE TABLE results (dataset VARCHAR, task VARCHAR, method VARCHAR, config_hash VARCHAR, "
                "protocol VARCHAR, seed INTEGER, n_regions INTEGER, r2 DOUBLE, chosen VARCHAR, "
                "created_at TIMESTAMP, PRIMARY KEY (dataset, task, method, config_hash, protocol, seed))")
    con.execute("INSERT INTO results VALUES ('d', 'crime', 'raw-poi', 'h1', 'nested', 0, 10, 0.5, '[]', now()), "
                "('d', 'crime', 'knn-location', 'h2', 'nested', 0, 10, 0.4, '[]', now())")
    con.close()
    with ResultStore(path) as store:
        rows = store.rows()
        assert {(r["method"], r["head"], r["r2"]) for r in rows} == {("raw-poi", "ridge", 0.5),
                                                                       ("knn-location", "knn", 0.4)}
        base = {"dataset": "d", "task": "crime", "method": "raw-poi", "config_hash": "h1", "protocol": "nested",
                "seed": 0}
        assert store.add({**base, "head": "moe", "r2": 0.7})  # same key but another head: a new row
        assert not store.add({**base, "head": "ridge", "r2": 0.9})  # the migrated row keeps its key
    with ResultStore(path) as store:  # reopening a migrated store changes nothing
        assert len(store.rows()) == 3


def test_moe_masks_missing_labels_and_reports_expert_utilisation() -> None:
    from urbanprofile.heads.moe import UrbanMoE

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6))
    Y = np.column_stack([X[:, 0] * 2 + 5, np.abs(X[:, 1]) + 1])
    Y[:15, 1] = np.nan  # missing labels (e.g. CityView GDP fill values)
    model = UrbanMoE(blocks=(4, 2), max_epochs=20, threshold=0.3, top_k=1, random_state=0).fit(X, Y)
    pred = model.predict(X)
    assert pred.shape == (60, 2) and np.isfinite(pred).all()
    table = model.expert_utilisation(X, ["a", "b"])
    assert list(table.index) == ["a", "b"]
    assert table["mean_active"].tolist() == [1.0, 1.0]  # top-1 routing
    assert np.isnan(table.loc["a", "b0"]) and np.isnan(table.loc["b", "a1"])  # not a candidate of that gate
    shared = table[["shared0", "shared1", "a0", "a1"]].loc["a"].to_numpy()
    assert np.isclose(shared.sum(), 1.0)  # each region goes to exactly one of task a's candidates
    dense = UrbanMoE(blocks=(4, 2), max_epochs=20, random_state=0).fit(X, Y)
    weights = dense.expert_utilisation(X, ["a", "b"], weights=True)
    assert np.allclose(weights.drop(columns="mean_active").sum(axis=1, skipna=True), 1.0)  # gate rows sum to 1
    values = weights.drop(columns="mean_active").to_numpy(dtype=float)
    assert (values[np.isfinite(values)] < 1.0).all()  # no top-k: the gate splits each task over its experts
    with pytest.raises(ValueError, match="do not add up"):
        UrbanMoE(blocks=(4, 4)).fit(X, Y)


def test_prompt4re_attends_over_training_prompts_only() -> None:
    from urbanprofile.heads.prompt4re import Prompt4REHead

    rng = np.random.default_rng(0)
    E, P = rng.normal(size=(50, 4)), rng.normal(size=(50, 12))
    y = np.abs(E[:, 0] + P[:, 0]) * 10
    X = np.hstack([E, P])
    head = Prompt4REHead(n_region_features=4, max_epochs=15, random_state=0).fit(X[:40], y[:40])
    assert head.module_.bank.shape == (40, 12)  # the training fold's prompt vectors, nothing else
    # A test region's prediction depends on itself and the training bank, not on other test regions.
    alone = head.predict(X[40:41])
    together = head.predict(X[40:50])
    np.testing.assert_allclose(alone[0], together[0], rtol=1e-5)
    assert head.module_.bank.shape == (40, 12)
    for kwargs in ({"attention": "region"}, {"align": False}):
        other = Prompt4REHead(n_region_features=4, max_epochs=5, random_state=0, **kwargs).fit(X[:40], y[:40])
        assert np.isfinite(other.predict(X[40:])).all()
    with pytest.raises(ValueError, match="prompt vectors"):
        Prompt4REHead(n_region_features=4, n_prompts=5).fit(X[:40], y[:40])


def test_untrained_prompt4re_predicts_what_the_ridge_head_predicts() -> None:
    from urbanprofile.data.tasks import task_data
    from urbanprofile.heads.probes import make_probe
    from urbanprofile.heads.prompt4re import Prompt4REHead
    from urbanprofile.methods import get_method

    city = make_synthetic_city(n_regions=60, n_poi_categories=8, random_state=1)
    counts = get_method("raw-poi").build(0).fit_transform(city)
    rng = np.random.default_rng(0)
    starts = set()
    # checkin/seed 1 makes the probe choose log1p features and target; service_calls/seed 0 log1p features
    # with scaling; crime/seed 0 raw features and target, unscaled.
    for task, seed in (("checkin", 1), ("service_calls", 0), ("crime", 0)):
        td = task_data(city, task)
        E = counts.loc[td.region_ids].to_numpy(dtype=float)
        X = np.hstack([E, rng.normal(size=(len(E), 2 * 16))])
        train = np.arange(len(E)) < 45
        for protocol in ("nested", "paper"):
            ridge = make_probe("ridge", protocol == "paper", seed).fit(E[train], td.y[train])
            starts.add(tuple(ridge.chosen()[k] for k in ("log_features", "scale", "log_target")))
            for align in (True, False):  # Prompt4RE and the concatenation ablation
                head = Prompt4REHead(n_region_features=E.shape[1], n_prompts=2, align=align, max_epochs=0,
                                     ridge_start="paper" if protocol == "paper" else "tuned",
                                     random_state=seed).fit(X[train], td.y[train])
                assert head.epochs_ == 0
                expected = ridge.predict(E)
                np.testing.assert_allclose(head.predict(X), expected, rtol=1e-5, atol=1e-5 * expected.max())
    assert {(True, False, True), (True, True, False), (False, False, False)} <= starts  # every branch ran
    # Training keeps the ridge part fixed (the prompt path is a residual) unless asked to train it too.
    untrained = Prompt4REHead(n_region_features=E.shape[1], n_prompts=2, max_epochs=0).fit(X[train], td.y[train])
    for train_start in (False, True):
        trained = Prompt4REHead(n_region_features=E.shape[1], n_prompts=2, max_epochs=4, patience=4, lr=1e-2,
                                train_start=train_start).fit(X[train], td.y[train])
        assert trained.chosen()["start"] == make_probe("ridge", False, 0).fit(E[train], td.y[train]).chosen()
        same = torch.equal(trained.module_.out_e.weight, untrained.module_.out_e.weight)
        assert same != train_start
        assert not torch.equal(trained.module_.out_p.weight, untrained.module_.out_p.weight)


def test_joint_heads_share_folds_and_rows_record_the_head(small_city: CityData, tmp_path: Path) -> None:
    cities = {"synthetic": small_city}
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["pca"], tasks=None, protocols=["spatial"], seeds=[0],
                         heads=["ridge", "mlp-multitask"])
    with ResultStore(tmp_path / "r.duckdb") as store:
        outcome = run_benchmark(plan, store=store, progress=False, cities=cities)
        assert {(r["task"], r["head"]) for r in outcome.rows} == {
            (t, h) for t in small_city.tasks for h in ("ridge", "mlp-multitask")}
        assert all(r["chosen"] for r in outcome.rows)
        again = run_benchmark(plan, store=store, progress=False, cities=cities)
        assert again.rows == [] and again.n_resumed == 6


def test_prompt_heads_refuse_bad_vectors(tmp_path: Path, small_city: CityData) -> None:
    from urbanprofile.evaluation.protocols import evaluate_embedding
    from urbanprofile.heads.prompts import load_prompt_vectors

    bad_rows = tmp_path / "rows.npy"
    np.save(bad_rows, np.zeros((39, 8), dtype=np.float32))
    with pytest.raises(DataError, match=r"rows\.npy: 39 rows of prompt vectors but the dataset has 40"):
        load_prompt_vectors(bad_rows, 40)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((40, 8), dtype=np.int64))
    with pytest.raises(DataError, match=r"ints\.npy: prompt vectors must be floats"):
        load_prompt_vectors(ints, 40)
    nans = tmp_path / "nan.npy"
    values = np.zeros((40, 8), dtype=np.float16)
    values[7, 3] = np.nan
    np.save(nans, values)
    with pytest.raises(DataError, match=r"nan\.npy: prompt vector of region row 7"):
        load_prompt_vectors(nans, 40)
    embedding = __import__("urbanprofile.methods", fromlist=["get_method"]).get_method("pca").build(0)
    frame = embedding.fit_transform(small_city)
    with pytest.raises(MethodUnavailableError, match="prompt4re-llama needs the shipped prompt vectors"):
        evaluate_embedding(small_city, frame, "crime", "nested", "prompt4re-llama")


def test_cli_unknown_head_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "urbanprofile.cli", "evaluate", "hafusion-chicago", "--method", "pca",
         "--task", "crime", "--head", "prompt4re-gpt5", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown head 'prompt4re-gpt5'") and result.stderr.count("\n") == 1


def test_modality_blocks_name_their_columns(small_city: CityData) -> None:
    from urbanprofile.embedders.multimodal.modal_blocks import ModalityBlocks

    frame = ModalityBlocks(modalities=("poi", "landuse", "mobility")).fit_transform(small_city)
    names, sizes = embedding_blocks(frame.columns)
    assert {"poi", "landuse", "mobility"} <= set(names)
    assert sum(sizes) == frame.shape[1] and max(sizes) <= 33
    assert np.isfinite(frame.to_numpy()).all()
