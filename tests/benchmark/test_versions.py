"""Code versions per component: a row covers its method, the evaluation and the head it used, no other head."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pytest

from urbanprofile.benchmark import versions
from urbanprofile.benchmark.runner import BenchmarkPlan, plan_units, run_benchmark
from urbanprofile.benchmark.store import ResultStore, StoredState
from urbanprofile.benchmark.versions import code_version, module_closure, normalised_source_hash
from urbanprofile.data import CityData
from urbanprofile.heads.registry import HEAD_MODULES, HEAD_NAMES, parse_head
from urbanprofile.methods import get_method

RAW = get_method("raw-poi").factory
PLAN = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "pca"], tasks=["crime"],
                     protocols=["paper", "nested"], seeds=[0])
MOE = "heads/moe.py"
Edit = Callable[[str], str]


@pytest.fixture
def edit_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, Edit], None]]:
    """Point the version finder at a copy of the package, and edit one file of the copy."""
    root = tmp_path / "urbanprofile"
    shutil.copytree(versions.SOURCE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(versions, "SOURCE_ROOT", root)
    versions.clear_caches()

    def edit(relative: str, change: Callable[[str], str]) -> None:
        path = root / relative
        path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")
        versions.clear_caches()

    yield edit
    monkeypatch.undo()
    versions.clear_caches()


def comment_only(text: str) -> str:
    """A new comment and a reworded module docstring: what the code does is unchanged."""
    return "# reworded by a test\n" + text.replace('"""', '"""Reworded. ', 1)


def code_change(text: str) -> str:
    return text + "\n_EDITED_BY_A_TEST = 1\n"


def test_a_row_covers_only_the_head_it_used() -> None:
    ridge, moe = code_version(RAW, "ridge"), code_version(RAW, "moe")
    prompt = code_version(RAW, "prompt4re-llama")
    others = {"urbanprofile.heads.moe", "urbanprofile.heads.neural", "urbanprofile.heads.prompt4re",
              "urbanprofile.heads.prompts", "urbanprofile.encoders.llm"}
    assert not others & set(ridge.modules)
    assert {"urbanprofile.heads.probes", "urbanprofile.evaluation.protocols",
            "urbanprofile.embedders.baselines.raw"} <= set(ridge.modules)
    assert {"urbanprofile.heads.moe", "urbanprofile.heads.neural"} <= set(moe.modules)
    assert "urbanprofile.heads.prompt4re" not in moe.modules
    assert {"urbanprofile.heads.prompts", "urbanprofile.encoders.llm"} <= set(prompt.modules)
    assert len({ridge.version, moe.version, prompt.version}) == 3
    assert code_version(RAW, "knn") == ridge  # the same probe module
    assert code_version(RAW) == ridge  # the default head


def test_every_head_kind_declares_its_modules() -> None:
    kinds = {parse_head(name).kind for name in HEAD_NAMES}
    assert kinds == set(HEAD_MODULES)
    declared = {m for modules in HEAD_MODULES.values() for m in modules}
    assert all(module_closure((m,)) for m in declared)  # every declared module exists
    # What build_head (and the prompt features of the protocols) import to build a head is declared.
    for dispatcher in ("urbanprofile.heads.registry", "urbanprofile.evaluation.protocols"):
        heads = {m for m in versions._imports(dispatcher) if m.startswith("urbanprofile.heads.")}
        assert heads - {"urbanprofile.heads.registry"} <= declared, dispatcher


def _grid_state(city: CityData) -> tuple[BenchmarkPlan, dict[str, CityData], dict[tuple[object, ...], StoredState]]:
    """A ridge + moe grid whose every cell is stored as current (nothing runs)."""
    plan = BenchmarkPlan(datasets=["synthetic"], methods=["raw-poi", "pca"], tasks=["crime", "service_calls"],
                         protocols=["paper", "nested"], seeds=[0], heads=["ridge", "moe"])
    cities = {"synthetic": city}
    units, reused, replaced, _, _ = plan_units(plan, cities=cities)
    assert not reused and not replaced
    stored = {}
    for unit in units:
        for key, (_, _, head) in zip(unit.keys(), unit.cells, strict=True):
            version = code_version(unit.spec.factory, head)
            stored[key] = StoredState(version.version, "ok", unit.fingerprint, version.modules)
    return plan, cities, stored


def test_moe_edits_recompute_only_moe_rows(city: CityData, edit_source) -> None:  # type: ignore[no-untyped-def]
    plan, cities, stored = _grid_state(city)
    assert len(stored) == 16
    edit_source(MOE, comment_only)
    units, reused, replaced, _, _ = plan_units(plan, cities=cities, stored=stored)
    assert units == [] and len(reused) == 16
    edit_source(MOE, code_change)
    units, reused, replaced, _, _ = plan_units(plan, cities=cities, stored=stored)
    assert {k[-1] for k in replaced} == {"moe"} and len(replaced) == 8
    assert {k[-1] for k in reused} == {"ridge"} and len(reused) == 8
    assert {h for u in units for _, _, h in u.cells} == {"moe"}


def test_a_stored_ridge_grid_survives_moe_edits(city: CityData, tmp_path: Path, edit_source) -> None:  # type: ignore[no-untyped-def]
    cities = {"synthetic": city}
    with ResultStore(tmp_path / "r.duckdb") as store:
        first = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        assert len(first.rows) == 4
        edit_source(MOE, comment_only)
        assert run_benchmark(PLAN, store=store, progress=False, cities=cities).n_resumed == 4
        edit_source(MOE, code_change)
        again = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        assert again.rows == [] and again.n_resumed == 4
        # The probe every ridge row used does recompute them, with the same figures.
        edit_source("heads/probes.py", code_change)
        changed = run_benchmark(PLAN, store=store, progress=False, cities=cities)
    assert len(changed.recomputed) == 4 and changed.n_resumed == 0
    assert sorted(r["r2"] for r in changed.rows) == sorted(r["r2"] for r in first.rows)


def test_a_store_from_before_per_component_versions_keeps_and_reuses_its_rows(city: CityData, tmp_path: Path) -> None:
    """Rows whose version covered every head's modules (and an older MoE head) are current for a ridge grid."""
    cities = {"synthetic": city}
    path = tmp_path / "before.duckdb"
    with ResultStore(path) as store:
        first = run_benchmark(PLAN, store=store, progress=False, cities=cities)
    con = duckdb.connect(str(path))
    for method in ("raw-poi", "pca"):
        module = get_method(method).factory.partition(":")[0]
        every_head = module_closure((module, *versions.EVALUATION_MODULES))  # as the earlier versions covered
        assert "urbanprofile.heads.moe" in every_head
        hashes = {m: normalised_source_hash((versions.SOURCE_ROOT / (m.removeprefix("urbanprofile.").replace(
            ".", "/") + ".py")).read_text(encoding="utf-8")) for m in every_head}
        hashes["urbanprofile.heads.moe"] = "0" * 12
        con.execute("UPDATE results SET code_version = 'before', code_modules = ? WHERE method = ?",
                    [json.dumps(hashes), method])
    con.close()
    with ResultStore(path) as store:
        again = run_benchmark(PLAN, store=store, progress=False, cities=cities)
        kept = store.rows()
    assert again.rows == [] and again.n_resumed == 4
    assert [r["r2"] for r in kept] == [r["r2"] for r in sorted(first.rows, key=lambda r: (r["protocol"], r["method"]))]
    assert {r["code_version"] for r in kept} == {"before"}
