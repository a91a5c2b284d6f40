"""Paths that must hold at a country's scale: chunked embedding output, sampled blocks and inner CV, the generator."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli

from urbanprofile.data import CityData, load_dataset
from urbanprofile.data.embedding_parts import check_chunk_rows, check_embedding_target, part_files, write_embedding
from urbanprofile.data.embeddings import DATASET_ATTR, file_hash, read_embedding_file
from urbanprofile.errors import UrbanProfileError
from urbanprofile.evaluation import large, spatial
from urbanprofile.evaluation.protocols import evaluate_embedding
from urbanprofile.heads.probes import RidgeProbe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from synthetic_country import CountrySpec, bbox_for_cells, generate, write_dataset


@pytest.fixture(scope="module")
def country(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded country (about 2,000 H3 resolution-9 cells) as a built dataset folder."""
    root = tmp_path_factory.mktemp("country")
    spec = CountrySpec(bbox=bbox_for_cells(2_000), n_pois=10_000, n_trips=2_000, seed=0, chunk_rows=3_000,
                       labels_resolution=9)
    generate(spec, root / "in")
    return write_dataset(root / "in", root / "built")


# -- the generator -----------------------------------------------------------------------------------
def test_generator_is_seeded_chunked_and_inside_its_box(tmp_path: Path) -> None:
    bbox = bbox_for_cells(5_000)
    spec = CountrySpec(bbox=bbox, n_pois=7_000, n_trips=3_000, seed=3, chunk_rows=2_000)
    first = generate(spec, tmp_path / "a")
    generate(spec, tmp_path / "b")
    for name in ("pois", "trips"):
        a, b = pd.read_parquet(tmp_path / "a" / f"{name}.parquet"), pd.read_parquet(tmp_path / "b" / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b)
    other = generate(CountrySpec(bbox=bbox, n_pois=7_000, seed=4, chunk_rows=2_000), tmp_path / "c")
    pois = pd.read_parquet(tmp_path / "a" / "pois.parquet")
    assert not pois.equals(pd.read_parquet(tmp_path / "c" / "pois.parquet"))
    assert first["counts"] == {"pois": 7_000, "trips": 3_000} and other["counts"]["trips"] == 0
    west, south, east, north = bbox
    assert pois["lon"].between(west, east).all() and pois["lat"].between(south, north).all()
    trips = pd.read_parquet(tmp_path / "a" / "trips.parquet")
    assert ((trips["time"] >= 0) & (trips["time"] < 24)).all()
    # Clustered: the densest 1% of a 20 x 20 grid holds far more than 1% of the POIs (uniform would be ~1%).
    grid, _, _ = np.histogram2d(pois["lon"], pois["lat"], bins=20)
    assert np.sort(grid.ravel())[::-1][:4].sum() / len(pois) > 0.05


def test_generator_refuses_impossible_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk rows"):
        generate(CountrySpec(bbox=(0, 0, 1, 1), n_pois=10, chunk_rows=0), tmp_path)
    with pytest.raises(ValueError, match="bbox"):
        generate(CountrySpec(bbox=(1, 0, 0, 1), n_pois=10), tmp_path)


# -- chunked embedding output ------------------------------------------------------------------------
def test_chunked_embed_output_equals_the_single_file(country: Path, tmp_path: Path) -> None:
    single = run_cli("embed", str(country), "--method", "raw-poi", "--out", str(tmp_path / "one.parquet"))
    assert single.returncode == 0, single.stderr
    parts = run_cli("embed", str(country), "--method", "raw-poi", "--out", f"{tmp_path / 'parts'}/",
                    "--chunk-rows", "500")
    assert parts.returncode == 0, parts.stderr
    n = load_dataset(country).n_regions
    files = part_files(tmp_path / "parts")
    assert len(files) == -(-n // 500) and "part files" in parts.stderr
    whole, chunked = read_embedding_file(tmp_path / "one.parquet"), read_embedding_file(tmp_path / "parts")
    pd.testing.assert_frame_equal(whole, chunked)
    assert chunked.attrs[DATASET_ATTR] == whole.attrs[DATASET_ATTR]
    # A folder of parts is an embedding like any other (`evaluate --embedding DIR`): its content hash keys the
    # results store, and a changed part is a new result.
    before = file_hash(tmp_path / "parts")
    assert before == file_hash(tmp_path / "parts")
    files[-1].write_bytes(files[0].read_bytes())
    assert file_hash(tmp_path / "parts") != before


def test_write_embedding_chunks_files_and_replaces_only_part_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(1_003, 4)), columns=[f"emb_{i}" for i in range(4)],
                         index=pd.Index([f"r{i}" for i in range(1_003)], name="region_id"))
    frame.attrs[DATASET_ATTR] = "built-x"
    write_embedding(frame, tmp_path / "whole.parquet")
    write_embedding(frame, tmp_path / "rows.parquet", chunk_rows=100)
    write_embedding(frame, tmp_path / "whole.csv")
    write_embedding(frame, tmp_path / "rows.csv", chunk_rows=100)
    _, n_parts = write_embedding(frame, f"{tmp_path / 'dir'}/", chunk_rows=250)
    assert n_parts == 5
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "rows.parquet").num_row_groups == 11
    for name in ("rows.parquet", "dir"):
        pd.testing.assert_frame_equal(read_embedding_file(tmp_path / name),
                                      read_embedding_file(tmp_path / "whole.parquet"))
    assert (tmp_path / "rows.csv").read_text() == (tmp_path / "whole.csv").read_text()
    with pytest.raises(UrbanProfileError, match="already exists"):
        write_embedding(frame, tmp_path / "dir")
    _, n_parts = write_embedding(frame.iloc[:10], tmp_path / "dir", chunk_rows=250, overwrite=True)
    assert n_parts == 1 and len(read_embedding_file(tmp_path / "dir")) == 10
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    with pytest.raises(UrbanProfileError, match="not embedding parts"):
        write_embedding(frame, tmp_path / "dir", overwrite=True)
    assert (tmp_path / "dir" / "notes.txt").read_text() == "mine"  # nothing of the user's deleted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "10"])
def test_bad_chunk_sizes_are_refused(value: object) -> None:
    with pytest.raises(UrbanProfileError, match="--chunk-rows must be a whole number"):
        check_chunk_rows(value)


def test_bad_chunk_size_and_target_on_the_command_line(country: Path, tmp_path: Path) -> None:
    result = run_cli("embed", str(country), "--method", "raw-poi", "--out", f"{tmp_path / 'd'}/", "--chunk-rows", "0")
    assert_user_error(result, "--chunk-rows must be a whole number of rows >= 1, got 0")
    assert not (tmp_path / "d").exists()
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UrbanProfileError, match="taken: exists and is not a folder"):
        check_embedding_target(f"{tmp_path / 'taken'}/")
    result = run_cli("embed", str(country), "--method", "raw-poi", "--out", str(tmp_path / "e.json"))
    assert_user_error(result, "e.json", "must end in .parquet or .csv, or be a folder")


# -- spatial blocks and inner CV at scale ------------------------------------------------------------
def _blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 500, size=(40, 2))
    return centres[rng.integers(0, 40, n)] + rng.normal(scale=8, size=(n, 2))


def test_spatial_blocks_on_a_large_set_are_fast_and_memory_light(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.cluster import KMeans

    fitted: list[int] = []
    fit = KMeans.fit
    monkeypatch.setattr(KMeans, "fit", lambda self, X, *a, **k: fitted.append(len(X)) or fit(self, X, *a, **k))
    monkeypatch.setattr(spatial, "BLOCK_FIT_SAMPLE", 10_000)  # the same path as 50,000 of a million, in CI time
    xy = _blobs(200_000)
    tracemalloc.start()
    labels = spatial.block_labels(xy, 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(np.unique(labels)) == 50 and labels.shape == (200_000,)
    # Fast: the 10 k-means starts run on the seeded sample only (on every point they take 125 s at a million
    # cells here), then one nearest-centre pass. Light: numpy's allocations (traced, so independent of the
    # machine's load) stay a small multiple of the coordinates.
    assert fitted == [10_000]
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"
    np.testing.assert_array_equal(labels, spatial.block_labels(xy, 50))  # seeded
    # Every point is in the block of its nearest block centre: blocks are contiguous Voronoi cells.
    centres = np.array([xy[labels == b].mean(axis=0) for b in range(50)])
    some = np.random.default_rng(1).choice(len(xy), 2_000, replace=False)
    nearest = np.argmin(((xy[some, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    assert (nearest == labels[some]).mean() > 0.97


def test_small_cities_keep_their_blocks(city: CityData) -> None:
    from sklearn.cluster import KMeans

    xy = city.coordinates_km()
    expected = KMeans(n_clusters=5, n_init=10, random_state=spatial.BLOCK_SEED).fit_predict(xy)
    np.testing.assert_array_equal(spatial.spatial_blocks(city, 5), expected)


def test_ridge_inner_cv_samples_large_training_sets_and_fits_on_all() -> None:
    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, size=(3_000, 6)).astype(float)
    y = X @ rng.uniform(0, 2, 6) + rng.normal(size=3_000)
    groups = rng.integers(0, 12, 3_000)
    every = RidgeProbe(inner_max_rows=None).fit(X, y, groups=groups)
    same = RidgeProbe(inner_max_rows=3_000).fit(X, y, groups=groups)
    assert every.chosen() == same.chosen() and every.cv_error_ == same.cv_error_  # at or below the cap: unchanged
    sampled = RidgeProbe(inner_max_rows=500).fit(X, y, groups=groups)
    again = RidgeProbe(inner_max_rows=500).fit(X, y, groups=groups)
    assert sampled.chosen() == again.chosen() and sampled.cv_error_ == again.cv_error_  # seeded
    assert sampled.cv_error_ != every.cv_error_  # the settings were chosen on the sample...
    assert len(sampled.X_train_) == 3_000  # ...and the probe is fit on every training row
    np.testing.assert_allclose(sampled.predict(X[:50]), every.predict(X[:50]), rtol=0.05, atol=0.5)


def test_large_evaluations_report_each_fold_and_memory(city: CityData, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    embedding = city.views["poi_counts"].astype(float)
    evaluate_embedding(city, embedding, "crime", "spatial", random_state=0)
    assert "fold" not in capsys.readouterr().err  # a small city: silent as before
    monkeypatch.setattr(large, "LARGE_EVALUATION", 10)
    evaluate_embedding(city, embedding, "crime", "spatial", random_state=0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and lines[-1].startswith(f"{city.name} crime spatial: fold 5/5 done")
    assert "peak memory" in lines[-1] and lines[-1].endswith("GB)")
