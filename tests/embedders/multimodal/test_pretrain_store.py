"""UrbanFusion pretraining from a modality store on disk (DataLoader over memory-mapped arrays), checkpoints, and
the ``pretrain`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_error, run_cli

from urbanprofile.data import make_synthetic_city
from urbanprofile.embedders.multimodal.pretrain_store import (
    META,
    ModalityStore,
    StoreWriter,
    moments,
    open_store,
    write_store,
)
from urbanprofile.embedders.multimodal.urbanfusion import UrbanFusionEmbedder, city_modalities
from urbanprofile.errors import DataError

COUNTS = ("poi", "landuse", "mobility")
SMALL = {"train_modalities": COUNTS, "epochs": 3, "batch_size": 16, "d_model": 32, "random_state": 0}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def city_store(tmp_path: Path) -> tuple[object, Path]:
    city = make_synthetic_city(n_regions=70, random_state=0)
    feats = city_modalities(city, COUNTS)
    feats.present["poi"][:9] = False  # some absent rows: stored as NaN, masked
    feats.values["poi"][:9] = np.nan
    return city, write_store(tmp_path / "store", feats.values, feats.present)


def _weights(model: UrbanFusionEmbedder) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.model_.state_dict().items()}


def test_loader_over_the_store_trains_the_in_memory_model(city_store: tuple[object, Path]) -> None:
    city, store = city_store
    in_memory = UrbanFusionEmbedder(**SMALL)
    in_memory.names_, in_memory.dims_ = list(COUNTS), open_store(store).dims
    opened = open_store(store)
    in_memory.fit_store(ModalityStore.from_arrays({m: np.array(opened.values[m]) for m in COUNTS},
                                                  {m: np.array(opened.present[m]) for m in COUNTS}))
    loaded = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    assert loaded.loss_history_ == in_memory.loss_history_  # same seed, same batches: the same numbers
    for name, value in _weights(in_memory).items():
        np.testing.assert_array_equal(value, _weights(loaded)[name], err_msg=name)
    assert isinstance(open_store(store).values["poi"], np.memmap)
    other = UrbanFusionEmbedder(**{**SMALL, "random_state": 1}, pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    assert other.loss_history_ != loaded.loss_history_


@pytest.mark.scale  # starting the loader's worker processes takes tens of seconds on a loaded machine
def test_loader_worker_processes_give_the_same_model(city_store: tuple[object, Path]) -> None:
    city, store = city_store
    small = {**SMALL, "epochs": 2}
    one = UrbanFusionEmbedder(**small, pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    two = UrbanFusionEmbedder(**small, pretrain_store=str(store), loader_workers=2).fit(city)  # type: ignore[arg-type]
    assert two.loss_history_ == one.loss_history_
    for name, value in _weights(one).items():
        np.testing.assert_array_equal(value, _weights(two)[name], err_msg=name)


def test_pretraining_on_the_city_in_memory_equals_pretraining_on_its_store(city_store: tuple[object, Path],
                                                                           tmp_path: Path) -> None:
    city = make_synthetic_city(n_regions=70, random_state=0)
    feats = city_modalities(city, COUNTS)
    store = write_store(tmp_path / "whole", feats.values, feats.present)
    direct = UrbanFusionEmbedder(**SMALL).fit_transform(city)
    from_store = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store)).fit_transform(city)
    np.testing.assert_array_equal(direct.to_numpy(), from_store.to_numpy())


def test_sharded_steps_are_seeded_and_differ_from_whole_batches(city_store: tuple[object, Path]) -> None:
    city, store = city_store
    whole = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    halves = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store), shards=2).fit(city)  # type: ignore[arg-type]
    again = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store), shards=2).fit(city)  # type: ignore[arg-type]
    assert halves.loss_history_ == again.loss_history_
    assert halves.loss_history_ != whole.loss_history_  # InfoNCE over half-batches is another objective
    with pytest.raises(ValueError, match="batch_size >= 2 \\* shards"):
        UrbanFusionEmbedder(**{**SMALL, "batch_size": 6}, shards=4).fit(city)  # type: ignore[arg-type]


def test_moments_are_chunk_wise_and_skip_absent_rows() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=(1000, 4)).astype(np.float32)
    present = rng.random(1000) < 0.8
    values[~present] = np.nan
    mean, std, count = moments(values, present, rows=97)
    assert count == present.sum()
    np.testing.assert_allclose(mean, values[present].mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, values[present].std(0), rtol=1e-4)


def test_checkpoint_round_trip_embeds_the_same(city_store: tuple[object, Path], tmp_path: Path) -> None:
    city, store = city_store
    model = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    folder = model.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["urbanfusion.json", "urbanfusion.safetensors"]
    back = UrbanFusionEmbedder.from_checkpoint(folder)
    np.testing.assert_array_equal(back.transform(city).to_numpy(), model.transform(city).to_numpy())  # type: ignore[arg-type]
    narrower = make_synthetic_city(n_regions=70, n_poi_categories=5, random_state=0)
    with pytest.raises(DataError, match="modality 'poi' is 5-d here, the model was pretrained on"):
        back.transform(narrower)
    (folder / "urbanfusion.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="not an urbanfusion checkpoint"):
        UrbanFusionEmbedder.from_checkpoint(folder)


def test_a_bad_store_is_one_clear_error(city_store: tuple[object, Path], tmp_path: Path) -> None:
    city, store = city_store
    with pytest.raises(DataError, match="not a modality store"):
        open_store(tmp_path)
    with pytest.raises(DataError, match="no 'text' modality"):
        UrbanFusionEmbedder(**{**SMALL, "train_modalities": ("text",)},
                            pretrain_store=str(store)).fit(city)  # type: ignore[arg-type]
    np.save(store / "poi.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(DataError, match=r"poi.npy: shape \(5, 3\)"):
        open_store(store)
    meta = json.loads((store / META).read_text())
    (store / META).write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(DataError, match="is not 'urbanprofile-modality-store/1'"):
        open_store(store)


def test_store_writer_leaves_nothing_when_unfinished(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s", {"poi": 3}, 10)
    writer.append({"poi": np.ones((4, 3))}, {"poi": np.ones(4, bool)})
    with pytest.raises(DataError, match="4 of 10 rows"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    writer = StoreWriter(tmp_path / "s", {"poi": 3}, 4)
    with pytest.raises(DataError, match="6 rows given for 4"):
        writer.append({"poi": np.ones((6, 3))}, {"poi": np.ones(6, bool)})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_pretrain_command_writes_a_checkpoint(city_store: tuple[object, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    city, store = city_store
    out = tmp_path / "ckpt"
    args = ("pretrain", str(store), "--out", str(out), "--epochs", "2", "--batch-size", "16", "--d-model", "32")
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 0, stderr
    assert "pretrained urbanfusion on 70 locations" in stderr and "s per epoch" in stderr
    model = UrbanFusionEmbedder.from_checkpoint(out)
    assert len(model.loss_history_) == 2 and model.transform(city).shape == (70, 32 * 3)  # type: ignore[arg-type]
    code, _, stderr = run_cli(monkeypatch, capsys, *args)
    assert_one_error(code, stderr, "already exists", "--overwrite")
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--in-memory", "--overwrite")
    assert code == 0, stderr
    assert UrbanFusionEmbedder.from_checkpoint(out).loss_history_ == model.loss_history_  # the same numbers
    code, _, stderr = run_cli(monkeypatch, capsys, "pretrain", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "other"))
    assert_one_error(code, stderr, "nowhere", "not a modality store")
    assert not (tmp_path / "other").exists()
    code, _, stderr = run_cli(monkeypatch, capsys, *args[:3], str(tmp_path / "x"), "--address", "auto")
    assert_one_error(code, stderr, "--address needs --executor ray")
    code, _, stderr = run_cli(monkeypatch, capsys, *args[:3], str(tmp_path / "x"), "--batch-size", "1")
    assert_one_error(code, stderr, "batch_size")
    assert not (tmp_path / "x").exists()
