"""The generic registry, and the worked examples that add a head and a dataset family (docs/extending.md)."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import load_example
from helpers import run_cli as run_in_process

from urbanprofile import registry
from urbanprofile.data import make_synthetic_city
from urbanprofile.data.registry import FAMILIES, discover, list_datasets, load_dataset
from urbanprofile.errors import DataError, UnknownNameError, UrbanProfileError
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.evaluation.protocols import (
    PROTOCOL_REGISTRY,
    PROTOCOLS,
    Protocol,
    evaluate_tasks,
    get_protocol,
    protocol_unavailable_reason,
    register_protocol,
)
from urbanprofile.heads.registry import HEAD_MODULES, HEADS, list_heads, parse_head
from urbanprofile.methods import METHODS, MethodSpec, get_method, list_methods
from urbanprofile.registry import DuplicateNameError, Registry

PLUGIN_MODULE = "urbanprofile_test_plugins"




@pytest.fixture
def saved_registries() -> Iterator[None]:
    """Every registry as it was, afterwards: what a test registers or loads does not leak into the next."""
    saved = [(r, dict(r.items), dict(r.broken), r._plugins_loaded, dict(r._plugin_sources))
             for r in (METHODS, HEADS, FAMILIES, PROTOCOL_REGISTRY)]
    yield
    for reg, items, broken, loaded, sources in saved:
        reg.items.clear()
        reg.items.update(items)
        reg.broken.clear()
        reg.broken.update(broken)
        reg._plugins_loaded = loaded
        reg._plugin_sources.clear()
        reg._plugin_sources.update(sources)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch, saved_registries: None) -> Iterator[types.ModuleType]:
    """A fake installed package whose entry points the registries will read (on their next first read)."""
    module = types.ModuleType(PLUGIN_MODULE)
    module.GOOD = MethodSpec("plugin-raw", "urbanprofile.embedders.baselines.raw:RawViews", {"views": ("poi_counts",)},
                             requires_views=("poi_counts",), description="a plug-in")
    module.CLASH = MethodSpec("plugin-raw", "urbanprofile.embedders.baselines.raw:RawViews",
                              {"views": ("landuse_counts",)})
    module.NOT_A_SPEC = 42
    monkeypatch.setitem(sys.modules, PLUGIN_MODULE, module)
    METHODS._plugins_loaded = False
    METHODS.items.pop("plugin-raw", None)
    yield module


def _entry_points(monkeypatch: pytest.MonkeyPatch, *points: tuple[str, str]) -> None:
    listed = [EntryPoint(name, value, "urbanprofile.methods") for name, value in points]
    monkeypatch.setattr(registry, "entry_points", lambda group: [p for p in listed if p.group == group])


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    return run_in_process(monkeypatch, capsys, *args, width=200)


# -- the registry itself ----------------------------------------------------------------------------------
def test_register_get_names_and_did_you_mean() -> None:
    colours: Registry[int] = Registry("colour")
    colours.register("red", 1)
    colours.register("green", 2)
    assert colours.names() == ["red", "green"] and colours.get("green") == 2 and "red" in colours
    with pytest.raises(UnknownNameError, match=r"unknown colour 'gren' \(did you mean 'green'\?\); valid: green, red"):
        colours.get("gren")
    with pytest.raises(DuplicateNameError, match="colour 'red' is already registered"):
        colours.register("red", 3)
    colours.register("red", 3, replace=True)
    assert colours.get("red") == 3
    colours.unregister("red")
    assert colours.names() == ["green"]


def test_unknown_head_and_method_say_did_you_mean() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'ridge'"):
        parse_head("rigde")
    with pytest.raises(UnknownNameError, match="did you mean 'raw-poi'"):
        get_method("raw-pio")


def test_a_plugin_method_loads_from_its_entry_point(plugins: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, ("plugin-raw", f"{PLUGIN_MODULE}:GOOD"))
    assert "plugin-raw" in list_methods()
    assert get_method("plugin-raw") is plugins.GOOD


def test_a_broken_plugin_does_not_stop_the_cli(plugins: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _entry_points(monkeypatch, ("missing", "urbanprofile_no_such_package.methods:SPEC"),
                  ("wrong-type", f"{PLUGIN_MODULE}:NOT_A_SPEC"), ("plugin-raw", f"{PLUGIN_MODULE}:GOOD"))
    code, stdout, stderr = run_cli(capsys, monkeypatch, "methods", "list")
    assert code == 0, stderr
    assert "raw-poi" in stdout and "plugin-raw" in stdout  # the others still work
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: method plug-in")]
    assert len(warnings) == 2, stderr
    assert "'missing' not loaded: urbanprofile_no_such_package.methods:SPEC failed to import (ModuleNotFoundError" \
        in warnings[0]
    assert "'wrong-type' not loaded" in warnings[1] and "is a int, not a method" in warnings[1]
    with pytest.raises(UrbanProfileError, match="method plug-in 'missing' is installed but not loaded: "):
        get_method("missing")  # asking for it by name says why, not "unknown method"


def test_two_plugins_with_one_name_are_a_one_line_error(plugins: types.ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _entry_points(monkeypatch, ("plugin-raw", f"{PLUGIN_MODULE}:GOOD"), ("plugin-raw-2", f"{PLUGIN_MODULE}:CLASH"))
    code, _, stderr = run_cli(capsys, monkeypatch, "methods", "list")
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("error: method 'plugin-raw' is registered twice: by plug-in "
                             f"{PLUGIN_MODULE}:GOOD and by plug-in {PLUGIN_MODULE}:CLASH")


def test_a_plugin_cannot_take_a_builtin_name(plugins: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins.SHADOW = MethodSpec("raw-poi", "urbanprofile.embedders.baselines.raw:RawViews",
                                {"views": ("landuse_counts",)})
    _entry_points(monkeypatch, ("raw-poi", f"{PLUGIN_MODULE}:SHADOW"))
    with pytest.raises(DuplicateNameError, match="'raw-poi' is registered twice: by a built-in"):
        list_methods()


# -- worked example: a new head is one module + one registration -----------------------------------------
@pytest.fixture
def lasso(saved_registries: None) -> Iterator[types.ModuleType]:
    module = load_example("custom_head")
    module.register()
    yield module
    sys.modules.pop(module.__name__, None)


def test_new_head_is_one_module_and_one_registration(lasso: types.ModuleType) -> None:
    assert "lasso" in list_heads() and parse_head("lasso").kind == "lasso"
    assert HEAD_MODULES["lasso"] == (lasso.__name__,)  # its results' code version covers its own module
    city = make_synthetic_city(n_regions=60, random_state=0)
    embedding = get_method("raw-poi").build(random_state=0).fit_transform(city)
    task = city.tasks[0]
    by_protocol = {p: evaluate_embedding(city, embedding, task, protocol=p, head="lasso") for p in
                   ("paper", "nested", "spatial")}
    for protocol, result in by_protocol.items():
        assert np.isfinite(result.metrics["r2"]), protocol
        assert result.head == "lasso"
    assert {c["alpha"] for c in by_protocol["paper"].chosen} == {1.0}  # the fixed-probe policy reached the head
    assert all(c["alpha"] in lasso.ALPHAS for c in by_protocol["nested"].chosen)
    joint = evaluate_tasks(city, embedding, city.tasks[:2], protocol="nested", head="lasso")
    assert [r.task for r in joint] == city.tasks[:2]


def test_head_registration_is_cleaned_up() -> None:
    assert "lasso" not in list_heads()
    with pytest.raises(UnknownNameError):
        parse_head("lasso")


# -- worked example: a new dataset family is one module + one registration -------------------------------
def _write_csv_city(root: Path, name: str, drop: str | None = None) -> None:
    city = make_synthetic_city(n_regions=40, random_state=1)
    folder = root / "csv" / name
    folder.mkdir(parents=True)
    tables: dict[str, Any] = {
        "regions.csv": city.regions[["lon", "lat"]],
        "poi_counts.csv": city.view("poi_counts"),
        "targets.csv": city.targets,
    }
    for file, frame in tables.items():
        if file != drop:
            frame.rename_axis("region_id").to_csv(folder / file)


@pytest.fixture
def csv_family(saved_registries: None) -> Iterator[types.ModuleType]:
    module = load_example("custom_family")
    module.register()
    yield module
    sys.modules.pop(module.__name__, None)


def test_new_dataset_family_is_one_module_and_one_registration(csv_family: types.ModuleType,
                                                               tmp_path: Path) -> None:
    _write_csv_city(tmp_path, "Springfield")
    assert list_datasets(tmp_path) == ["csv-springfield"]
    city = load_dataset("csv-springfield", tmp_path)
    assert city.n_regions == 40 and "poi_counts" in city.views and city.has_locations
    embedding = get_method("raw-poi").build(random_state=0).fit_transform(city)
    result = evaluate_embedding(city, embedding, city.tasks[0], protocol="spatial")
    assert np.isfinite(result.metrics["r2"])


def test_new_family_reports_a_missing_file(csv_family: types.ModuleType, tmp_path: Path) -> None:
    _write_csv_city(tmp_path, "Shelbyville", drop="targets.csv")
    assert not discover(tmp_path)["csv-shelbyville"].complete
    with pytest.raises(DataError, match=r"Shelbyville/targets.csv: file not found"):
        load_dataset("csv-shelbyville", tmp_path)


def test_family_registration_is_cleaned_up(tmp_path: Path) -> None:
    _write_csv_city(tmp_path, "Springfield")
    assert "csv-city" not in FAMILIES.names()
    assert list_datasets(tmp_path) == []  # csv/ holds no polygon + GeoTIFF pair, so no family claims it


# -- protocols are objects: splits, probe policy, what they run on ---------------------------------------
class HalfSplit(Protocol):
    """A toy protocol: two outer folds, the first and second half of the regions."""

    def splits(self, city: Any, task: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        half = len(task.y) // 2
        everything = np.arange(len(task.y))
        return [(everything[half:], everything[:half]), (everything[:half], everything[half:])]


def test_protocols_know_their_policy_and_what_they_run_on() -> None:
    assert [get_protocol(p).fixed_probe for p in ("paper", "nested", "spatial")] == [True, False, False]
    with pytest.raises(UnknownNameError, match="did you mean 'nested'"):
        get_protocol("nestd")
    city = make_synthetic_city(n_regions=40, random_state=0)
    assert get_protocol("spatial").unavailable_reason(city) is None
    city.regions = city.regions.drop(columns=["lon", "lat"])
    assert not city.has_locations
    assert get_protocol("spatial").unavailable_reason(city) == "spatial protocol needs region locations; " \
        "'synthetic' has none"
    assert get_protocol("nested").unavailable_reason(city) is None
    assert "fixed Ridge" in (protocol_unavailable_reason("ridge-blocks", "paper") or "")
    assert protocol_unavailable_reason("ridge-blocks", "nested") is None


def test_a_registered_protocol_runs_with_its_own_splits_and_policy(saved_registries: None) -> None:
    register_protocol(HalfSplit("halves", "first half against second half", fixed_probe=True))
    assert "halves" in PROTOCOLS and PROTOCOLS["halves"] == "first half against second half"
    city = make_synthetic_city(n_regions=40, random_state=0)
    embedding = get_method("raw-poi").build(random_state=0).fit_transform(city)
    result = evaluate_embedding(city, embedding, city.tasks[0], protocol="halves")
    assert sorted(set(result.fold)) == [0, 1] and result.protocol == "halves"
    assert [c["alpha"] for c in result.chosen] == [1.0, 1.0]  # its fixed probe policy reached the ridge head
    assert protocol_unavailable_reason("ridge-blocks", "halves") is not None


def test_protocol_registration_is_cleaned_up() -> None:
    assert "halves" not in PROTOCOLS
