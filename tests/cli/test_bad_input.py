"""A malformed data directory gets a one-line error naming what is wrong, exit code 2, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_user_error
from helpers import run_cli_process as run_cli


def _break(folder: Path, case: str) -> None:
    poi = np.load(folder / "poi_dist.npy")
    if case == "missing-file":
        (folder / "crime_counts.npy").unlink()
    elif case == "wrong-rank":
        np.save(folder / "poi_dist.npy", poi.ravel())
    elif case == "disagreeing-views":
        np.save(folder / "landUse_dist.npy", np.load(folder / "landUse_dist.npy")[:-2])
    elif case == "non-square-od":
        np.save(folder / "mob_dist.npy", np.load(folder / "mob_dist.npy")[:, :-1])
    elif case == "nan-counts":
        bad = poi.astype(float)
        bad[3, 2] = np.nan
        np.save(folder / "poi_dist.npy", bad)
    elif case == "negative-counts":
        poi[4, 1] = -5
        np.save(folder / "poi_dist.npy", poi)
    elif case == "corrupt-npy":
        (folder / "mob_dist.npy").write_bytes(b"\x93NUMPY garbage")
    elif case == "pickled-object-array":
        np.save(folder / "check_counts.npy", np.array([{"a": 1}] * len(poi), dtype=object), allow_pickle=True)
    elif case == "no-crs":
        (folder / "regions" / "cells.prj").unlink()
    elif case == "invalid-geometry":
        import geopandas as gpd
        from shapely.geometry import Polygon

        frame = gpd.read_file(folder / "regions" / "cells.shp")
        bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
        frame.loc[5, "geometry"] = bowtie
        frame.to_file(folder / "regions" / "cells.shp")
    elif case == "bad-neighbors":
        (folder / "neighbors.json").write_text('{"0": [1, 9999]}')


CASES = {
    "missing-file": ("crime_counts.npy", "file not found"),
    "wrong-rank": ("poi_dist.npy", "2-D"),
    "disagreeing-views": ("landUse_dist.npy", "has 28 regions but poi_dist.npy has 30"),
    "non-square-od": ("mob_dist.npy", "square"),
    "nan-counts": ("poi_counts", "NaN", "region 3"),
    "negative-counts": ("poi_counts", "negative", "region 4"),
    "corrupt-npy": ("mob_dist.npy", "not a readable .npy"),
    "pickled-object-array": ("check_counts.npy", "pickle", "refused"),
    "no-crs": ("cells.shp", "no CRS"),
    "invalid-geometry": ("cells.shp", "invalid geometry", "region 5"),
    "bad-neighbors": ("neighbors.json", "9999"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_dataset(make_data_dir: Callable[..., Path], tmp_path: Path, case: str) -> None:
    root = make_data_dir()
    _break(root / "hafusion" / "testcity", case)
    out = tmp_path / "emb.parquet"
    result = run_cli("embed", "hafusion-testcity", "--method", "raw-poi", "--out", str(out), data_dir=root)
    assert_user_error(result, *CASES[case])
    assert not out.exists()
    assert not list(tmp_path.glob(".emb.parquet*"))


def test_incomplete_folder_is_listed_not_hidden(make_data_dir: Callable[..., Path]) -> None:
    root = make_data_dir()
    (root / "hafusion" / "testcity" / "mob_dist.npy").unlink()
    listing = run_cli("datasets", "list", data_dir=root)
    assert listing.returncode == 0 and "incomplete" in listing.stdout and "mob_dist.npy" in listing.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("datasets", "info", "atlantis"), ("unknown dataset 'atlantis'", "hafusion-testcity")),
        (("evaluate", "hafusion-testcity", "-m", "raw-pois", "-t", "crime"),
         ("unknown method", "did you mean 'raw-poi'")),
        (("evaluate", "hafusion-testcity", "-m", "raw-poi", "-t", "crimes"), ("unknown task", "crime")),
        (("evaluate", "hafusion-testcity", "-m", "raw-poi", "-t", "crime", "-p", "magic"),
         ("unknown protocol", "nested")),
        (("evaluate", "hafusion-testcity", "-m", "raw-poi", "-t", "gdp"), ("no task 'gdp'",)),
        (("benchmark", "--seeds", "a,b"), ("--seeds",)),
        (("embed", "hafusion-testcity", "-m", "raw-poi", "--out", "x.txt"), (".parquet or .csv",)),
        (("evaluate", "hafusion-testcity", "--bogus"), ("No such option: --bogus", "evaluate --help")),
        (("r1", "train", "-d", "hafusion-testcity", "-t", "crime", "-o", "run", "--entropy-coef", "abc"),
         ("--entropy-coef",)),
    ],
)
def test_unknown_names(make_data_dir: Callable[..., Path], tmp_path: Path, args: tuple[str, ...], fragments) -> None:
    root = make_data_dir()
    assert_user_error(run_cli(*args, data_dir=root, cwd=tmp_path), *fragments)
    assert not (tmp_path / "results").exists()


def test_missing_data_dir(tmp_path: Path) -> None:
    assert_user_error(run_cli("datasets", "list", data_dir=tmp_path / "nowhere"), "does not exist")
