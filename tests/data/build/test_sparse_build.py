"""A large city's trips stay sparse end to end: build -> write -> load -> validate -> methods (issue 22).

The threshold (``SPARSE_VIEW_ABOVE``, 3,000 regions) is lowered with monkeypatch so small builds take the
sparse path; they must give exactly the numbers of the dense path.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import urbanprofile.data.build.trips as trips
import urbanprofile.data.loaders.built as built
from urbanprofile.data import load_dataset
from urbanprofile.data.build.pipeline import build_city, build_dataset
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.data.city import is_sparse_view
from urbanprofile.errors import MethodUnavailableError


def _spec(raw: dict[str, Path]) -> BuildSpec:
    return BuildSpec(city="toy", regions=raw["regions"], region_name_column="name", pois=raw["pois"],
                     categories=["food", "shop", "school"], landuse=raw["landuse"], trips=raw["trips"])


def _large(monkeypatch: pytest.MonkeyPatch, above: int = 10) -> None:
    """Make cities of more than ``above`` regions count as large (sparse square views)."""
    monkeypatch.setattr(trips, "SPARSE_VIEW_ABOVE", above)
    monkeypatch.setattr(built, "SPARSE_VIEW_ABOVE", above)


def _rows(path: Path, keys: list[str]) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values(keys).reset_index(drop=True)


def test_sparse_build_writes_the_dense_build_values(raw_city: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    dense_out, sparse_out = tmp_path / "dense", tmp_path / "sparse"
    build_dataset(_spec(raw_city), dense_out)
    dense = load_dataset(dense_out)
    assert not is_sparse_view(dense.views["od_flows"]) and "od_patterns" in dense.views
    _large(monkeypatch)
    in_memory = build_city(_spec(raw_city)).city
    assert is_sparse_view(in_memory.views["od_flows"]) and "od_patterns" not in in_memory.views
    build_dataset(_spec(raw_city), sparse_out)
    # The files on disk are the same rows: OD cells and (pattern, origin, destination) trips.
    od_keys = ["origin", "destination"]
    pd.testing.assert_frame_equal(_rows(sparse_out / "od_flows.parquet", od_keys),
                                  _rows(dense_out / "od_flows.parquet", od_keys))
    pattern_keys = ["pattern", "origin", "destination"]
    pd.testing.assert_frame_equal(_rows(sparse_out / "od_patterns.parquet", pattern_keys),
                                  _rows(dense_out / "od_patterns.parquet", pattern_keys))
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (dense_out, sparse_out)]
    assert manifests[0]["views"] == manifests[1]["views"]
    # Loaded as large, the OD view stays sparse (validated without densifying) and equals the dense one.
    city = load_dataset(sparse_out)
    od = city.views["od_flows"]
    assert is_sparse_view(od)
    assert od.sparse.density < 1 and np.array_equal(od.sparse.to_dense().to_numpy(), dense.views["od_flows"].to_numpy())
    assert od.to_numpy().sum() == 299
    assert "od_patterns" not in city.views
    assert any("od_patterns kept on disk only" in note for note in city.meta["notes"])
    # The dense time patterns equal the rows kept on disk.
    patterns = dense.od_patterns()
    rows = pd.read_parquet(sparse_out / "od_patterns.parquet")
    position = {region: k for k, region in enumerate(dense.region_ids)}
    rebuilt = np.zeros_like(patterns)
    rebuilt[rows["pattern"], rows["origin"].map(position), rows["destination"].map(position)] = rows["trips"]
    assert np.array_equal(rebuilt, patterns) and patterns.sum() == 299


def test_mgfn_says_why_it_cannot_use_a_large_city(raw_city: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from urbanprofile.embedders.multiview.mgfn import MGFNEmbedder

    _large(monkeypatch)
    build_dataset(_spec(raw_city), tmp_path / "toy")
    with pytest.raises(MethodUnavailableError, match=r"od_patterns are kept on disk only") as caught:
        MGFNEmbedder(epochs=1).fit(load_dataset(tmp_path / "toy"))
    assert "\n" not in str(caught.value)


def test_srel_sparse_inputs_read_the_sparse_view(raw_city: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SREL above its dense limit takes the OD view as CSR, with the values of the dense build."""
    from urbanprofile.embedders.multiview.inputs import MultiViewInputs

    build_dataset(_spec(raw_city), tmp_path / "toy")
    dense = load_dataset(tmp_path / "toy").views["od_flows"].to_numpy(dtype=float)
    _large(monkeypatch)
    city = load_dataset(tmp_path / "toy")
    inputs = MultiViewInputs.from_city(city, sparse_mode=True, mobility_dims=4)
    assert inputs.sparse and sparse.issparse(inputs.od)
    assert np.array_equal(inputs.od.toarray(), dense)
    assert inputs.features["mobility"].shape == (city.n_regions, 8)


def test_sparse_trips_allocate_nothing_square(raw_city: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """About 3,450 H3 cells: the dense path peaks at ~380 MB (N x N int64 is 95 MB); the sparse one at ~14 MB."""
    spec = BuildSpec(city="toy", boundary="0,0,0.06,0.05", h3_resolution=10, trips=raw_city["trips"])
    _large(monkeypatch)
    tracemalloc.start()
    try:
        city = build_city(spec).city
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    n = city.n_regions
    assert n > 2000 and is_sparse_view(city.views["od_flows"])
    assert peak < n * n * 8 / 4, f"peak {peak / 1e6:.1f} MB for {n} regions"
