"""Using a pretrained UrbanFusion checkpoint from the command line: a store written from datasets
(``pretrain-store``), ``embed --checkpoint`` and ``evaluate --checkpoint``, and their one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_hafusion_city
from helpers import assert_one_error, run_cli

from urbanprofile.data.embeddings import read_embedding_file
from urbanprofile.data.registry import load_dataset
from urbanprofile.embedders.multimodal.dataset_store import write_dataset_store
from urbanprofile.embedders.multimodal.pretrain_store import open_store, write_store
from urbanprofile.embedders.multimodal.pretrained import checkpoint_hash
from urbanprofile.embedders.multimodal.pretraining import pretrain_checkpoint
from urbanprofile.embedders.multimodal.urbanfusion import UrbanFusionEmbedder

COUNTS = ("poi", "landuse", "mobility")
#: One epoch of a tiny model: these tests are about the command line, not about what pretraining learns.
TINY = {"epochs": 1, "batch_size": 16, "d_model": 8, "n_heads": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory with two cities of 30 and 40 regions (their mobility profiles are 60-d and 80-d)."""
    root = tmp_path_factory.mktemp("data")
    write_hafusion_city(root, "one", n=30, seed=0)
    write_hafusion_city(root, "two", n=40, seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("URBANPROFILE_DATA", str(root))
        patch.setenv("URBANPROFILE_CACHE", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def ckpt(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint pretrained on both cities' count modalities (mobility from the first city only)."""
    work = tmp_path_factory.mktemp("pretrained")
    store = write_dataset_store(["hafusion-one", "hafusion-two"], work / "store", COUNTS, progress=False)
    out = work / "ckpt"
    pretrain_checkpoint(store.folder, out, random_state=0, **TINY)  # type: ignore[arg-type]
    return out


@pytest.fixture(autouse=True)
def _data_dir(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_DATA", str(data))
    monkeypatch.setenv("URBANPROFILE_CACHE", str(data / "cache"))


def _json_rows(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_pretrain_store_from_datasets_then_pretrain(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    code, _, stderr = run_cli(monkeypatch, capsys, "pretrain-store", "hafusion-one,hafusion-two", "--out", str(store),
                              "--modalities", ",".join(COUNTS))
    assert code == 0, stderr
    assert "wrote a modality store of 70 locations" in stderr
    # The second city's trip profile is as wide as twice its regions: absent there, and said so.
    assert "note: hafusion-two: modality 'mobility' is 80-d, the store's is 60-d (from hafusion-one)" in stderr
    opened = open_store(store)
    assert opened.n == 70 and opened.dims == {"poi": 12, "landuse": 6, "mobility": 60}
    assert opened.present["mobility"][:30].all() and not opened.present["mobility"][30:].any()
    assert np.isnan(opened.values["mobility"][30:]).all()
    meta = json.loads((store / "store.json").read_text())
    assert meta["sources"][1] == {"dataset": "hafusion-two", "rows": [30, 70], "modalities": ["poi", "landuse"]}
    # The rows are the city's modalities as UrbanFusion computes them on the city itself.
    from urbanprofile.embedders.multimodal.urbanfusion import city_modalities

    two = city_modalities(load_dataset("hafusion-two"), ["poi"], progress=False)
    np.testing.assert_array_equal(opened.values["poi"][30:], two.values["poi"])
    out = tmp_path / "ckpt"
    code, _, stderr = run_cli(monkeypatch, capsys, "pretrain", str(store), "--out", str(out), "--epochs", "1",
                              "--batch-size", "16", "--d-model", "8")
    assert code == 0, stderr
    assert UrbanFusionEmbedder.from_checkpoint(out).names_ == list(COUNTS)


def test_embed_with_a_checkpoint_writes_the_models_embedding(ckpt: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "one.parquet"
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-one", "--checkpoint", str(ckpt), "--out",
                              str(target))
    assert code == 0, stderr
    assert "wrote 30 regions x 24 dimensions" in stderr  # d_model 8 x 3 pretrained modalities
    written = read_embedding_file(target)
    city = load_dataset("hafusion-one")
    expected = UrbanFusionEmbedder.from_checkpoint(ckpt).transform(city)
    np.testing.assert_allclose(written.to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert list(written.index) == list(city.region_ids)
    # --method urbanfusion says the same; part files through the same writer; a subset of the modalities.
    folder = tmp_path / "parts"
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-two", "-m", "urbanfusion", "--checkpoint",
                              str(ckpt), "--modalities", "poi,landuse", "--out", f"{folder}/", "--chunk-rows", "16")
    assert code == 0, stderr
    assert "in 3 part files" in stderr
    subset = UrbanFusionEmbedder.from_checkpoint(ckpt)
    subset.modalities = ["poi", "landuse"]
    np.testing.assert_allclose(read_embedding_file(folder).to_numpy(),
                               subset.transform(load_dataset("hafusion-two")).to_numpy(), rtol=1e-6)


def test_evaluate_a_checkpoint_is_its_embedding_probed(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    probe = ("-t", "crime", "-p", "spatial", "--seeds", "0,1", "--json")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(ckpt), *probe)
    assert code == 0, stderr
    rows = _json_rows(stdout)
    assert [r["method"] for r in rows] == [f"urbanfusion:ckpt-{checkpoint_hash(ckpt)}"]  # frozen: one seed
    target = tmp_path / "one.parquet"
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-one", "--checkpoint", str(ckpt), "--out",
                              str(target))
    assert code == 0, stderr
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--embedding", str(target), *probe)
    assert code == 0, stderr
    (from_file,) = _json_rows(stdout)
    for metric in ("r2", "mae", "worst_block_r2"):
        assert rows[0][metric] == pytest.approx(from_file[metric], rel=1e-6, abs=1e-9), metric


def test_results_are_keyed_by_the_checkpoints_content(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "results.duckdb"
    probe = ("-t", "crime", "-p", "spatial", "--seeds", "0", "--json", "--store", str(store))
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(ckpt), *probe)
    assert code == 0, stderr
    (first,) = _json_rows(stdout)
    assert first["resumed"] is False
    copy = tmp_path / "elsewhere"
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "urbanfusion.json").read_text())
    meta["epoch_seconds"] = [s + 1.0 for s in meta["epoch_seconds"]]  # how long it took is not what it computes
    (copy / "urbanfusion.json").write_text(json.dumps(meta))
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(copy), *probe)
    assert code == 0, stderr
    (again,) = _json_rows(stdout)
    assert again["resumed"] is True and again["method"] == first["method"]
    other = tmp_path / "other"
    pretrain_checkpoint(open_store_folder(ckpt), other, random_state=1, **TINY)  # type: ignore[arg-type]
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(other), *probe)
    assert code == 0, stderr
    (changed,) = _json_rows(stdout)
    assert changed["resumed"] is False and changed["method"] != first["method"]
    assert changed["r2"] != first["r2"]


def test_benchmark_runs_checkpoints_beside_methods(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    probe = ("-t", "crime", "-p", "spatial", "--seeds", "0", "--json")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(ckpt), *probe)
    assert code == 0, stderr
    (alone,) = _json_rows(stdout)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "benchmark", "--datasets", "hafusion-one", "--methods",
                                   "raw-poi", "--checkpoints", str(ckpt), "--tasks", "crime", "--protocols", "spatial",
                                   "--seeds", "0", "--store", str(tmp_path / "grid.duckdb"), "--json")
    assert code == 0, stderr
    rows = {r["method"]: r for r in _json_rows(stdout)}
    name = f"urbanfusion:ckpt-{checkpoint_hash(ckpt)}"
    assert set(rows) == {"raw-poi", name}
    assert rows[name]["r2"] == pytest.approx(alone["r2"], rel=1e-9)  # the same probe as evaluate --checkpoint


@pytest.mark.parametrize("case", ["same checkpoint twice", "blank", "no checkpoint"])
def test_benchmark_checkpoints_bad_input_is_one_error(case: str, ckpt: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    given = {"same checkpoint twice": f"{ckpt},{copy}", "blank": " , ", "no checkpoint": str(tmp_path / "nowhere")}
    expected = {"same checkpoint twice": "hold the same checkpoint", "blank": "no checkpoint folder given",
                "no checkpoint": "no such checkpoint folder"}
    store = tmp_path / "grid.duckdb"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "benchmark", "--datasets", "hafusion-one", "--checkpoints",
                                   given[case], "--tasks", "crime", "--protocols", "spatial", "--seeds", "0",
                                   "--store", str(store))
    assert_one_error(code, stderr, expected[case])
    assert not stdout and not store.exists()


def open_store_folder(ckpt: Path) -> Path:
    """The store the module's checkpoint was pretrained on (beside it)."""
    return ckpt.parent / "store"


@pytest.mark.parametrize("case", ["missing", "file", "empty folder", "store folder", "corrupt"])
def test_a_folder_that_is_no_checkpoint_is_one_error(case: str, ckpt: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    given = {"missing": tmp_path / "nowhere", "file": ckpt / "urbanfusion.json", "empty folder": tmp_path,
             "store folder": open_store_folder(ckpt), "corrupt": tmp_path / "corrupt"}[case]
    expected = {"missing": "no such checkpoint folder", "file": "is a file, not a checkpoint folder",
                "empty folder": "no urbanfusion.json", "store folder": "no urbanfusion.json",
                "corrupt": "not an urbanfusion checkpoint"}[case]
    if case == "corrupt":
        shutil.copytree(ckpt, given)
        (given / "urbanfusion.safetensors").write_bytes(b"not safetensors")
    target = tmp_path / "out.parquet"
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-one", "--checkpoint", str(given), "--out",
                              str(target))
    assert_one_error(code, stderr, given.name, expected)
    assert not target.exists()
    code, _, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--checkpoint", str(given), "-t",
                              "crime")
    assert_one_error(code, stderr, given.name, expected)


def test_a_checkpoint_that_does_not_fit_the_dataset_is_one_error(ckpt: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "two.parquet"
    embed = ("embed", "hafusion-two", "--checkpoint", str(ckpt), "--out", str(target))
    code, _, stderr = run_cli(monkeypatch, capsys, *embed)
    assert_one_error(code, stderr, "hafusion-two: modality 'mobility' is 80-d here", "pretrained on 60-d",
                     "--modalities poi,landuse")
    code, _, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-two", "--checkpoint", str(ckpt),
                              "-t", "crime", "-p", "spatial")
    assert_one_error(code, stderr, "modality 'mobility' is 80-d here", "pretrained on 60-d")
    code, _, stderr = run_cli(monkeypatch, capsys, *embed, "--modalities", "location")
    assert_one_error(code, stderr, "modality 'location' was not pretrained", "poi, landuse, mobility")
    code, _, stderr = run_cli(monkeypatch, capsys, *embed, "--modalities", "mobilty")
    assert_one_error(code, stderr, "unknown modality 'mobilty'", "did you mean 'mobility'")
    # A checkpoint pretrained on modalities the dataset does not have at all (captions, here made up).
    rng = np.random.default_rng(0)
    text_store = write_store(tmp_path / "text-store", {"text": rng.normal(size=(40, 384)).astype(np.float32)},
                             {"text": np.ones(40, bool)})
    text_ckpt = tmp_path / "text-ckpt"
    pretrain_checkpoint(text_store, text_ckpt, random_state=0, **TINY)  # type: ignore[arg-type]
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-two", "--checkpoint", str(text_ckpt), "--out",
                              str(target))
    assert_one_error(code, stderr, "hafusion-two has none of the modalities", "pretrained on (text;",
                     "has: location, poi, landuse, mobility")
    assert not target.exists()


def test_checkpoint_goes_with_urbanfusion_only(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "x.parquet"
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-one", "-m", "srel", "--checkpoint", str(ckpt),
                              "--out", str(target))
    assert_one_error(code, stderr, "does not go with --method srel")
    code, _, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "-m", "raw-poi", "--checkpoint",
                              str(ckpt), "-t", "crime")
    assert_one_error(code, stderr, "does not go with --method raw-poi")
    code, _, stderr = run_cli(monkeypatch, capsys, "embed", "hafusion-one", "--out", str(target))
    assert_one_error(code, stderr, "give --method")
    pd.DataFrame({"region_id": [0], "e": [1.0]}).to_csv(tmp_path / "e.csv", index=False)
    code, _, stderr = run_cli(monkeypatch, capsys, "evaluate", "hafusion-one", "--embedding", str(tmp_path / "e.csv"),
                              "--checkpoint", str(ckpt), "-t", "crime")
    assert_one_error(code, stderr, "--embedding or --checkpoint, not both")
    assert not target.exists()


def test_pretrain_store_bad_input_writes_nothing(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    cases = [
        (("hafusion-one,hafusion-onee",), ("unknown dataset 'hafusion-onee'",)),
        (("hafusion-one,hafusion-one",), ("'hafusion-one' is given twice",)),
        (("hafusion-one", "--modalities", "text"), ("no dataset has the 'text' modality", "hafusion-one: location")),
        (("hafusion-one", "--modalities", "landus"), ("unknown modality 'landus'", "did you mean 'landuse'")),
    ]
    for args, fragments in cases:
        code, _, stderr = run_cli(monkeypatch, capsys, "pretrain-store", *args, "--out", str(store))
        assert_one_error(code, stderr, *fragments)
        assert list(tmp_path.iterdir()) == [], args  # no store, no partial folder
    existing = open_store_folder(ckpt)
    before = sorted(p.name for p in existing.iterdir())
    code, _, stderr = run_cli(monkeypatch, capsys, "pretrain-store", "hafusion-one", "--out", str(existing))
    assert_one_error(code, stderr, "already exists")
    assert sorted(p.name for p in existing.iterdir()) == before
