"""Config files: `--config FILE.toml` for build, benchmark and r1 train; flags override; bad keys are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

from urbanprofile import cli
from urbanprofile.apps.r1 import cli as r1_cli
from urbanprofile.apps.r1.config import R1Config
from urbanprofile.benchmark.runner import DEFAULT_SEEDS, BenchmarkPlan, StudyConfig
from urbanprofile.config import load_config, make_config
from urbanprofile.data.build.spec import BuildSpec
from urbanprofile.errors import UrbanProfileError

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process, as a user calls it: (exit code, stdout, stderr)."""
    return run_cli(monkeypatch, capsys, *args)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the loader ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("schema", "text", "fragments"), [
    (StudyConfig, 'protocol = ["nested"]\n', ("unknown key 'protocol'", "did you mean 'protocols'")),
    (BuildSpec, 'city = "a"\nh3_res = 9\n', ("unknown key 'h3_res'", "did you mean 'h3_resolution'")),
    (R1Config, 'lr = 0.1\n', ("unknown key 'lr'",)),
    (StudyConfig, 'seeds = "0,1"\n', ("key 'seeds' must be a list of int", "str")),
    (StudyConfig, 'seeds = [0, "1"]\n', ("key 'seeds' must be a list of int",)),
    (BuildSpec, 'city = "a"\nh3_resolution = 9.5\n', ("key 'h3_resolution' must be int",)),
    (BuildSpec, 'city = "a"\nh3_cover = "yes"\n', ("key 'h3_cover' must be bool",)),
    (BuildSpec, 'city = 3\n', ("key 'city' must be str",)),
    (R1Config, 'steps = true\n', ("key 'steps' must be int", "bool")),
    (R1Config, 'learning_rate = "fast"\n', ("key 'learning_rate' must be float",)),
    (StudyConfig, 'retries = 2\n[store]\npath = "x"\n', ("key 'store' must be a path",)),
    (StudyConfig, 'seeds = [0\n', ("not valid TOML",)),
])
def test_a_bad_key_or_value_is_one_line_naming_the_file_and_key(tmp_path: Path, schema: type, text: str,
                                                                 fragments: tuple[str, ...]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UrbanProfileError) as caught:
        load_config(path, schema)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_a_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UrbanProfileError, match="config file not found"):
        load_config(tmp_path / "nope.toml", StudyConfig)
    with pytest.raises(UrbanProfileError, match="is a folder"):
        load_config(tmp_path, StudyConfig)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe seeds")
    with pytest.raises(UrbanProfileError, match=r"bin\.toml"):
        load_config(tmp_path / "bin.toml", StudyConfig)


def test_values_are_typed_and_paths_expand_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYFILES", "/somewhere")
    path = write(tmp_path, 'city = "x"\nregions = "$CITYFILES/r.gpkg"\nmax_cells = 10\n'
                           'categories = {food = ["restaurant", "cafe"]}\n')
    values = load_config(path, BuildSpec)
    assert values["regions"] == Path("/somewhere/r.gpkg")
    assert values["categories"] == {"food": ["restaurant", "cafe"]}
    # A whole number is a fine float; a float is not a fine int.
    assert load_config(write(tmp_path, "learning_rate = 1\n"), R1Config) == {"learning_rate": 1}


def test_flags_override_the_file_and_defaults_come_from_the_dataclass(tmp_path: Path) -> None:
    values = load_config(write(tmp_path, 'datasets = ["a"]\ntask = "crime"\nsteps = 3\nbeta = 0.5\n'), R1Config)
    config = make_config(R1Config, values, {"steps": 7, "beta": None, "model": None})
    assert (config.steps, config.beta, config.model) == (7, 0.5, R1Config.model)
    with pytest.raises(UrbanProfileError, match=r"c\.toml: required key 'task' is missing"):
        make_config(R1Config, {"datasets": ["a"]}, {}, source=tmp_path / "c.toml")
    with pytest.raises(UrbanProfileError, match="missing --task"):
        make_config(R1Config, {}, {"datasets": ["a"]})


def test_the_study_defaults_are_the_plans() -> None:
    study = StudyConfig()
    assert tuple(study.protocols) == tuple(BenchmarkPlan().protocols)
    assert tuple(study.seeds) == DEFAULT_SEEDS


# -- the commands ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("command", "text", "fragment"), [
    (["benchmark", "--data-dir", "TMP"], 'protocol = ["nested"]\n', "did you mean 'protocols'"),
    (["benchmark", "--data-dir", "TMP"], "seeds = [-1]\n", "seeds: -1 is out of range"),
    (["build", "--out", "OUT"], 'regions = "r.gpkg"\n', "required key 'city' is missing"),
    (["build", "--out", "OUT"], 'city = "a"\nmax_cells = "many"\n', "key 'max_cells' must be int"),
    (["r1", "train", "--out", "OUT"], 'task = "crime"\n', "required key 'datasets' is missing"),
    (["r1", "train", "--out", "OUT"], 'datasets = ["a"]\ntask = "crime"\nseed = 1\n', "unknown key 'seed'"),
])
def test_each_command_stops_on_a_bad_file_with_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str],
        text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    out = tmp_path / "out"
    args = [{"OUT": str(out), "TMP": str(tmp_path)}.get(a, a) for a in command]
    code, _, stderr = run(monkeypatch, capsys, *args, "--config", str(path))
    assert code == 2
    line = one_error_line(stderr)
    assert str(path) in line and fragment in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_build_without_a_city_names_the_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(monkeypatch, capsys, "build", "--out", str(tmp_path / "out"))
    assert code == 2 and "missing CITY" in one_error_line(stderr)


def _capture(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[Any]:
    """Replace the function that would do the work with one that records what it was given."""
    seen: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> None:
        seen.append(args[0])
        raise UrbanProfileError("stopped by the test")

    monkeypatch.setattr(target, name, record)
    return seen


def test_without_config_the_commands_build_the_dataclass_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import urbanprofile.data.build.pipeline as build_module

    specs = _capture(monkeypatch, build_module, "build_dataset")
    code, _, stderr = run(monkeypatch, capsys, "build", "mycity", "--regions", "r.gpkg", "--out", str(tmp_path / "o"))
    assert code == 2 and "stopped by the test" in stderr
    assert specs == [BuildSpec("mycity", regions=Path("r.gpkg"))]

    configs = _capture(monkeypatch, r1_cli, "_r1_train")
    code, _, stderr = run(monkeypatch, capsys, "r1", "train", "-d", "a,b", "-t", "crime", "--model", "tiny-random",
                          "--device", "cpu", "--out", str(tmp_path / "run"))
    assert code == 2 and "stopped by the test" in stderr
    assert configs == [R1Config(datasets=["a", "b"], task="crime", model="tiny-random", device="cpu")]


def test_r1_train_takes_the_file_and_flags_override_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    configs = _capture(monkeypatch, r1_cli, "_r1_train")
    path = write(tmp_path, 'datasets = ["a"]\ntask = "crime"\nmodel = "tiny-random"\ndevice = "cpu"\n'
                           "steps = 3\nlearning_rate = 0.01\nbalanced = false\n")
    code, _, stderr = run(monkeypatch, capsys, "r1", "train", "--config", str(path), "--steps", "5", "--balanced",
                          "--seed", "4", "--out", str(tmp_path / "run"))
    assert code == 2 and "stopped by the test" in stderr
    assert configs == [R1Config(datasets=["a"], task="crime", model="tiny-random", device="cpu", steps=5,
                                learning_rate=0.01, balanced=True, random_state=4)]


def test_the_example_study_runs_and_matches_the_same_flags(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    study = load_config(EXAMPLES / "study.toml", StudyConfig)
    code, stdout, stderr = run(monkeypatch, capsys, "benchmark", "--config", str(EXAMPLES / "study.toml"),
                               "--store", str(tmp_path / "file.duckdb"), "--json")
    assert code == 0, stderr
    from_file = [json.loads(line) for line in stdout.splitlines()]
    code, stdout, stderr = run(
        monkeypatch, capsys, "benchmark", "--datasets", ",".join(study["datasets"]), "--methods",
        ",".join(study["methods"]), "--tasks", ",".join(study["tasks"]), "--protocols", ",".join(study["protocols"]),
        "--seeds", ",".join(map(str, study["seeds"])), "--store", str(tmp_path / "flags.duckdb"), "--json")
    assert code == 0, stderr
    from_flags = [json.loads(line) for line in stdout.splitlines()]
    assert len(from_file) == 1 and from_file[0]["method"] == "raw-poi"
    assert [r["r2"] for r in from_file] == [r["r2"] for r in from_flags]


def test_the_example_build_file_builds_olinda(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    code, _, stderr = run(monkeypatch, capsys, "build", "olinda2", "--config", str(EXAMPLES / "build.toml"),
                          "--out", str(tmp_path / "olinda"))
    assert code == 0, stderr
    from urbanprofile.data import load_dataset

    city = load_dataset(tmp_path / "olinda")
    assert json.loads((tmp_path / "olinda" / "manifest.json").read_text())["city"] == "olinda2"  # the argument won
    assert len(city.regions) == 470 and list(city.tasks) == ["V014"]


def _help_defaults(*path: str) -> dict[str, str]:
    """``name: default`` for every option of a command whose help says ``(default: X)``."""
    import re

    import typer

    command: Any = typer.main.get_command(cli.app)
    for name in path:
        command = command.commands[name]
    found = {}
    for param in command.params:
        match = re.search(r"default: ([^;)]+)\)", param.help or "")
        if match:
            found[param.name] = match.group(1).strip()
    return found


@pytest.mark.parametrize(("path", "schema", "renamed"), [
    (("r1", "train"), R1Config, {"seed": "random_state"}),
    (("build",), BuildSpec, {"h3_res": "h3_resolution", "time_patterns": "n_time_patterns"}),
    (("benchmark",), StudyConfig, {"store_path": "store"}),
])
def test_the_defaults_that_help_texts_show_are_the_dataclass_defaults(path: tuple[str, ...], schema: type,
                                                                       renamed: dict[str, str]) -> None:
    import dataclasses

    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(schema)}
    shown = _help_defaults(*path)
    assert len(shown) >= 3
    for name, text in shown.items():
        default = defaults.get(renamed.get(name, name))
        if isinstance(default, bool) or default is None:
            continue  # shown in words (yes, off, free), or the command's own (--data-dir: $URBANPROFILE_DATA)
        if isinstance(default, int | float):
            assert float(text) == default, name
        elif isinstance(default, list | tuple):
            assert text == ",".join(map(str, default)), name
        else:
            assert text == str(default), name
