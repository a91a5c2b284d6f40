"""The Beijing <-> Guangzhou section of benchmarks/curves.py: rows of multimodal_oor.json as mean ± sd over seeds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from curves import OOR_COLUMNS, oor_kind, oor_section


def _row(dataset: str, task: str, method: str, seed: int, r2: float) -> dict[str, Any]:
    return {"dataset": dataset, "task": task, "method": method, "seed": seed, "r2": r2, "protocol": "spatial"}


def _rows() -> list[dict[str, Any]]:
    other = "urbanfusion[pretrained on cityview-guangzhou only]"
    return [_row("cityview-beijing", "carbon", "knn-location", 0, 0.70),
            *[_row("cityview-beijing", "carbon", "urbanfusion[location,text]", s, r) for s, r in
              [(0, 0.60), (1, 0.64), (2, 0.62)]],
            *[_row("cityview-beijing", "carbon", other, s, r) for s, r in [(0, 0.50), (1, 0.54), (2, 0.52)]]]


def test_methods_go_to_their_column() -> None:
    assert oor_kind("knn-location") == OOR_COLUMNS[0]
    assert oor_kind("urbanfusion[location,text]") == OOR_COLUMNS[1]
    assert oor_kind("urbanfusion[pretrained on cityview-beijing only]") == OOR_COLUMNS[2]
    with pytest.raises(ValueError, match="raw-location"):
        oor_kind("raw-location")


def test_section_gives_mean_sd_over_seeds_and_the_differences() -> None:
    lines = oor_section(_rows())
    assert "seeds [0, 1, 2]" in lines[0] and "spatial" in lines[0]
    body = [line for line in lines[1].splitlines() if line.startswith("| cityview-beijing")]
    assert len(body) == 1
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    # knn-location ran once (no sd); urbanfusion's three seeds have mean 0.62 and 0.52, sd 0.02 each.
    assert cells[2:] == ["0.700", "0.620 ± 0.020", "0.520 ± 0.020", "-0.080", "-0.100", "-0.180"]


def test_a_missing_column_is_a_dash_not_a_number() -> None:
    rows = [r for r in _rows() if r["method"] != "knn-location"]
    cells = [c.strip() for c in oor_section(rows)[1].splitlines()[2].strip("|").split("|")]
    assert cells[2] == "-" and cells[5] == "-" and cells[7] == "-"
    assert cells[6] == "-0.100"
