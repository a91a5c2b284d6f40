"""The CLI's surface as a new user meets it: tables that fit the terminal, help, output paths, messages."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_error as one_error
from helpers import run_cli
from rich.console import Console

from urbanprofile import cli, clikit
from urbanprofile.cli import run as cli_run
from urbanprofile.report.terminal import Column, FitTable


def render(renderable: object, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def leaderboard_rows(rng: np.random.Generator) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for dataset in ("hafusion-chicago", "cityview-beijing-urbanvlp"):
        for task in ("checkin", "service_calls"):
            for protocol in ("paper", "nested", "spatial"):
                for method in ("raw-poi", "autoencoder", "knn-location"):
                    for seed in range(2):
                        rows.append({
                            "dataset": dataset, "task": task, "protocol": protocol, "method": method,
                            "head": "ridge", "seed": seed, "status": "ok", "n_regions": 77,
                            "r2": float(rng.uniform(-2, 1)), "mae": float(rng.uniform(1, 5000)),
                            "rmse": float(rng.uniform(1, 9000)), "worst_block_r2": float(rng.uniform(-60, 1)),
                            "r2_gap": float(rng.uniform(0, 3)), "morans_i": float(rng.uniform(-1, 1)),
                            "fit_seconds": float(rng.uniform(0, 900)),
                        })
    return rows


def shown_cells(text: str) -> set[str]:
    return {cell.strip() for line in text.splitlines() for cell in line.split("│") if cell.strip()}


# -- 1. tables fit the terminal --------------------------------------------------------------------------
@pytest.mark.parametrize("width", [80, 120])
def test_leaderboard_fits_without_cutting_a_name_or_figure(width: int) -> None:
    from urbanprofile.benchmark.runner import format_mean_std, leaderboard

    rows = leaderboard_rows(np.random.default_rng(0))
    text = render(cli_run._leaderboard_table(rows, "leaderboard (mean ± std over seeds)"), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    cells = shown_cells(text)
    for r in leaderboard(rows).to_dict("records"):
        assert r["method"] in cells  # names are whole cells, or said whole in a table's title
        assert f"dataset {r['dataset']}" in text.replace("\n", " ") or r["dataset"] in cells
        assert format_mean_std(r["r2_mean"], r["r2_std"]) in cells  # the figure that matters, whole
        assert f"{r['worst_block_r2_mean']:.3f}" in cells
    # worst-block R² is kept (rows split into one table per dataset rather than dropping it), once per table,
    # with its header whole (wrapped at its space, never cropped)
    assert text.count("worst-block") == text.count("┏")
    assert text.count("R²") >= 2 * text.count("┏")
    if width == 80:
        assert "not shown at this width" in text  # and says what it left out
    assert "paper†" in text and "for comparison" in text


def test_table_prints_blocks_when_even_the_names_do_not_fit() -> None:
    table = FitTable([Column("dataset"), Column("method"), Column("R²", "figure")])
    table.add_row("cityview-beijing-urbanvlp", "urbanfusion-location-text", "0.918 ± 0.012")
    text = render(table, 40)
    assert "…" not in text
    assert "cityview-beijing-urbanvlp · urbanfusion-location-text" in text.replace("\n", " ") or \
        "cityview-beijing-urbanvlp" in text
    assert "R²: 0.918 ± 0.012" in text


def test_constant_columns_move_to_the_title() -> None:
    table = FitTable([Column("dataset", to_title=True), Column("task"), Column("R²", "figure")], title="t")
    table.add_row("hafusion-nyc", "checkin", "0.748")
    table.add_row("hafusion-nyc", "crime", "0.483")
    text = render(table, 80)
    assert "dataset hafusion-nyc" in " ".join(text.split())
    assert "│ hafusion-nyc" not in text


def test_text_columns_wrap_and_fold_whole(tmp_path: Path) -> None:
    table = FitTable([Column("dataset"), Column("path", "text", priority=1), Column("status", "text")])
    long_path = "/data/" + "x" * 70 + "/labels.csv"
    table.add_row("cityview-beijing", long_path, "incomplete: missing labels.csv, captions.json")
    text = render(table, 80)
    assert "…" not in text
    joined = "".join(cell.strip() for line in text.splitlines() for cell in line.split("│")[2:3])
    assert long_path in joined


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str,
        width: int = 80) -> tuple[int, str, str]:
    """Run the CLI in this process at a terminal width; (exit code, stdout, stderr)."""
    return run_cli(monkeypatch, capsys, *args, width=width)


@pytest.mark.parametrize("args", [("methods", "list"), ("datasets", "list"), ("datasets", "info", "hafusion-testcity")])
def test_every_listing_fits_80_columns(args: tuple[str, ...], make_data_dir: Callable[..., Path],
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_DATA", str(make_data_dir()))
    code, stdout, stderr = run(capsys, monkeypatch, *args)
    assert code == 0, stderr
    assert "…" not in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 80
    if args == ("methods", "list"):
        from urbanprofile.methods import list_methods

        for name in list_methods():
            assert f"│ {name} " in stdout


# -- 2, 3. help alone, --version, help texts shown whole -------------------------------------------------
@pytest.mark.parametrize("args", [(), ("datasets",), ("r1",), ("methods",)])
def test_no_arguments_prints_help_alone(args: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, stderr = run(capsys, monkeypatch, *args)
    assert code == 0
    assert "Usage" in stdout + stderr
    assert "error" not in stderr


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from urbanprofile import __version__

    code, stdout, _ = run(capsys, monkeypatch, "--version")
    assert code == 0
    assert stdout.strip() == f"urbanprofile {__version__}"


def _commands() -> list[tuple[list[str], object]]:
    import typer

    found: list[tuple[list[str], object]] = []

    def walk(command: object, path: list[str]) -> None:
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(cli.app), [])
    return found


def test_every_help_text_with_brackets_is_shown_whole(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for path, command in _commands():
        texts = [getattr(p, "help", None) or "" for p in getattr(command, "params", [])]
        texts.append(getattr(command, "help", None) or "")
        texts = [" ".join(t.split()) for t in texts if "[" in t]
        if not texts:
            continue
        code, stdout, _ = run(capsys, monkeypatch, *path, "--help", width=400)
        assert code == 0
        flat = " ".join(stdout.replace("│", " ").split())
        for text in texts:
            from rich.markup import render

            shown = render(text).plain  # what the help shows after its markup (escapes) is applied
            assert shown in flat, f"{' '.join(path)}: {shown!r} not shown"
            assert "[" in shown
            checked += 1
    assert checked >= 3  # --executor, --head, --layer at least


# -- 4. output paths: no silent folders, no silent overwrite, one line when the disk or folder says no ----
@pytest.fixture
def testcity(make_data_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("URBANPROFILE_DATA", str(make_data_dir()))
    return "hafusion-testcity"




def embed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, out: Path,
          *extra: str) -> tuple[int, str, str]:
    return run(capsys, monkeypatch, "embed", name, "--method", "raw-poi", "--out", str(out), *extra)


def test_embed_refuses_a_missing_folder_unless_parents(testcity: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "deeper" / "emb.parquet"
    code, _, stderr = embed(capsys, monkeypatch, testcity, target)
    one_error(code, stderr, str(tmp_path / "out" / "deeper"), "--parents")
    assert not (tmp_path / "out").exists()
    code, _, stderr = embed(capsys, monkeypatch, testcity, target, "--parents")
    assert code == 0, stderr
    import pandas as pd

    frame = pd.read_parquet(target)
    assert len(frame) == 30


def test_embed_refuses_a_folder_and_an_existing_file(testcity: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "emb.parquet"
    folder.mkdir()
    one_error(*embed(capsys, monkeypatch, testcity, folder)[::2], str(folder), "folder")
    existing = tmp_path / "emb.csv"
    existing.write_text("mine\n")
    one_error(*embed(capsys, monkeypatch, testcity, existing)[::2], str(existing), "--overwrite")
    assert existing.read_text() == "mine\n"
    code, _, stderr = embed(capsys, monkeypatch, testcity, existing, "--overwrite")
    assert code == 0, stderr
    assert existing.read_text().startswith("region_id")


def _enospc(*args: object, **kwargs: object) -> None:
    import errno

    target = Path(str(args[1] if len(args) > 1 else kwargs["path"]))
    target.write_bytes(b"PAR1 half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_embed_full_disk_leaves_nothing(testcity: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    monkeypatch.setattr(pd.DataFrame, "to_parquet", _enospc)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "new" / "emb.parquet"
    code, _, stderr = embed(capsys, monkeypatch, testcity, target, "--parents")
    one_error(code, stderr, str(target), "No space left on device")
    assert list((tmp_path / "out").iterdir()) == []  # neither the partial file nor the folder made for it


def _read_only(*args: object, **kwargs: object) -> tuple[int, str]:
    import errno

    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_embed_and_report_in_a_read_only_folder(testcity: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "results.duckdb"
    code, _, stderr = run(capsys, monkeypatch, "benchmark", "--datasets", testcity, "--methods", "raw-poi",
                          "--tasks", "crime", "--protocols", "nested", "--seeds", "0", "--store", str(store))
    assert code == 0, stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    # Refused before any work when the folder says so (root may write anywhere, hence the stand-in) ...
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    one_error(*embed(capsys, monkeypatch, testcity, locked / "emb.parquet")[::2], str(locked), "permission")
    one_error(*run(capsys, monkeypatch, "report", "--store", str(store), "-o", str(locked / "report"),
                   "--no-maps")[::2], str(locked), "permission")
    monkeypatch.setattr(os, "access", real_access)
    # ... and one line, no leftovers, when the write itself is refused (a read-only file system).
    import tempfile

    monkeypatch.setattr(tempfile, "mkstemp", _read_only)
    one_error(*embed(capsys, monkeypatch, testcity, locked / "emb.parquet")[::2], "Permission denied")
    one_error(*run(capsys, monkeypatch, "report", "--store", str(store), "-o", str(locked / "report"),
                   "--no-maps")[::2], "Permission denied")
    assert list(locked.iterdir()) == []


def test_map_refuses_a_missing_folder(testcity: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "maps" / "poi.png"
    code, _, stderr = run(capsys, monkeypatch, "map", testcity, "--layer", "view:poi_counts", "-o", str(target))
    one_error(code, stderr, str(tmp_path / "maps"), "--parents")
    assert not target.parent.exists()


# -- 6. a task typo lists the dataset's own tasks ---------------------------------------------------------
def test_task_typo_names_only_the_datasets_tasks(testcity: str, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, stderr = run(capsys, monkeypatch, "evaluate", testcity, "-m", "raw-poi", "-t", "chekin")
    line = one_error(code, stderr, "did you mean 'checkin'", "crime", "service_calls", testcity)
    assert "carbon" not in line and "gdp" not in line


def test_a_datasets_own_indicator_is_a_valid_task(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    code, stdout, stderr = run(capsys, monkeypatch, "evaluate", "olinda", "-m", "raw-location", "-t", "V014",
                               "--seeds", "0", "--json")
    assert code == 0, stderr
    assert '"task": "V014"' in stdout


# -- 5. a failed r1 run does not block the corrected command; config errors name the file -----------------
def test_failed_r1_train_leaves_nothing_that_blocks(testcity: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from urbanprofile.apps.r1 import config as r1_config
    from urbanprofile.apps.r1 import loop
    from urbanprofile.errors import TrainingError, UrbanProfileError

    def fail(config: object, run_dir: Path, *args: object, **kwargs: object) -> None:
        assert (run_dir / "config.json").is_file()  # the failure comes after the run folder was started
        raise TrainingError("GRPO loss is nan at step 1")

    monkeypatch.setattr(loop, "_train_prefix", fail)
    run_dir = tmp_path / "runs" / "r1"
    (tmp_path / "runs").mkdir()
    args = ["r1", "train", "--datasets", testcity, "--task", "crime", "--model", "tiny-random", "--steps", "2",
            "-G", "2", "--no-sft", "--out", str(run_dir)]
    one_error(*run(capsys, monkeypatch, *args, "--lr", "1e9")[::2], "nan")
    assert not run_dir.exists()  # this command made it, and nothing in it was worth keeping
    # A folder the user made is kept, and the corrected command may take it over (no checkpoint in it).
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    one_error(*run(capsys, monkeypatch, *args, "--lr", "1e9")[::2], "nan")
    assert (run_dir / "notes.txt").read_text() == "mine"
    config = r1_config.R1Config(datasets=[testcity], task="crime", model="tiny-random", learning_rate=1e-3)
    r1_config.write_config(run_dir, config, resume=True)
    assert r1_config.read_config(run_dir).learning_rate == 1e-3
    # A folder with a checkpoint is a run to resume: another configuration is still refused.
    (run_dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    with pytest.raises(UrbanProfileError, match="another learning_rate"):
        r1_config.write_config(run_dir, r1_config.R1Config(datasets=[testcity], task="crime", model="tiny-random",
                                                           learning_rate=2e-3),
                               resume=True)


@pytest.mark.parametrize(("edit", "fragment"), [
    ({"steps": "ten"}, "'steps' must be an integer"),
    ({"bogus": 1}, "unknown field 'bogus'"),
    ({"answer": "colour"}, "answer"),
    ({"generations": 1}, "generations"),
    ({"datasets": "hafusion-nyc"}, "'datasets' must be a list"),
])
def test_r1_config_errors_name_the_file(edit: dict[str, object], fragment: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from urbanprofile.apps.r1.config import R1Config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    payload = {**R1Config(datasets=["hafusion-nyc"], task="crime").to_json(), **edit}
    (run_dir / "config.json").write_text(json.dumps(payload))
    code, _, stderr = run(capsys, monkeypatch, "r1", "evaluate", str(run_dir))
    one_error(code, stderr, str(run_dir / "config.json"), fragment)


# -- 8. raw baselines keep their features' names -----------------------------------------------------------
def test_raw_poi_embedding_has_category_names() -> None:
    from urbanprofile.data import make_synthetic_city
    from urbanprofile.evaluation import evaluate_embedding
    from urbanprofile.methods import get_method

    city = make_synthetic_city(n_regions=40, n_poi_categories=4, random_state=0)
    city.views["poi_counts"].columns = ["food", "shop", "park", "school"]
    embedding = get_method("raw-poi").build(random_state=0).fit_transform(city)
    assert list(embedding.columns) == ["poi_food", "poi_shop", "poi_park", "poi_school"]
    assert embedding.index.equals(city.region_ids)
    assert all(dtype.kind == "f" for dtype in embedding.dtypes)
    mobility = get_method("raw-all").build(random_state=0).fit_transform(city)
    ids = [str(r) for r in city.view("od_flows").columns]
    assert [c for c in mobility.columns if c.startswith(("out_", "in_"))] == \
        [f"out_{r}" for r in ids] + [f"in_{r}" for r in ids]
    # the names change nothing downstream: the same figures as the unnamed matrix
    unnamed = embedding.set_axis([f"emb_{k}" for k in range(4)], axis=1)
    named_r2 = evaluate_embedding(city, embedding, task="crime", protocol="nested").metrics["r2"]
    assert named_r2 == evaluate_embedding(city, unnamed, task="crime", protocol="nested").metrics["r2"]


# -- 7. one diverging scale for bias, the same in the CLI map and the HTML report ----------------------------
def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def test_bias_maps_share_one_fixed_scale(city: object) -> None:
    import pandas as pd

    from urbanprofile.report.html import _block_colour
    from urbanprofile.report.maps import BLOCK_R2_BOUND, MapLayer, _colours, map_figure

    ids = city.region_ids  # type: ignore[attr-defined]
    # Blocks that differ little (Olinda: all between -0.06 and 0.05) stay pale: no stark split.
    small = pd.Series(np.where(np.arange(len(ids)) % 2 == 0, -0.06, 0.05), index=ids)
    layer = MapLayer(small, "bias", diverging=True, legend="block R²", bound=BLOCK_R2_BOUND)
    hexes, _, norm = _colours(layer)
    assert (norm.vmin, norm.vmax) == (-1.0, 1.0)
    for colour in hexes:
        assert min(_rgb(colour)) > 200, colour  # near white
    # The CLI map and the report draw a block R² the same colour; worse than the mean is red, better blue.
    wide = pd.Series(np.linspace(-2.0, 1.0, len(ids)), index=ids)
    hexes, _, _ = _colours(MapLayer(wide, "bias", diverging=True, bound=BLOCK_R2_BOUND))
    for value, colour in zip(wide, hexes, strict=True):
        assert colour == _block_colour(float(value))
    red, _, blue = _rgb(_block_colour(-0.8))
    assert red > blue
    red, _, blue = _rgb(_block_colour(0.8))
    assert blue > red
    # Colour-bar labels are round numbers, and the bar says when values lie beyond the scale.
    figure = map_figure(city, MapLayer(wide, "bias", diverging=True, bound=BLOCK_R2_BOUND))  # type: ignore[arg-type]
    figure.canvas.draw()
    labels = [t.get_text().replace("−", "-") for t in figure.axes[-1].get_yticklabels()]
    assert labels == ["-1", "-0.5", "0", "0.5", "1"]


def test_residual_scale_is_fixed_by_the_label_not_the_residuals(city: object) -> None:
    from urbanprofile.report.maps import RESIDUAL_BOUND_STD, layer_values, nice_bound

    assert [nice_bound(v) for v in (0.06, 0.9, 1.0, 1.7, 3.3, 42.0)] == [0.1, 1.0, 1.0, 2.0, 5.0, 50.0]
    layer = layer_values(city, "residual:crime", method="raw-poi")  # type: ignore[arg-type]
    label = city.targets["crime"].to_numpy(dtype=float)  # type: ignore[attr-defined]
    assert layer.diverging
    assert layer.bound == nice_bound(RESIDUAL_BOUND_STD * float(np.nanstd(label)))


def test_a_long_header_wraps_whole_over_a_narrow_figure_column() -> None:
    table = FitTable([Column("dataset"), Column("worst-block R²", "figure", justify="right")])
    table.add_row("x" * 50, "0.795")
    text = render(table, 70)
    assert "R²" in text and "worst-block" in text and "0.795" in text


def test_info_of_a_dataset_without_views_says_so(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("URBANPROFILE_DATA", str(data_dir))
    code, stdout, stderr = run(capsys, monkeypatch, "datasets", "info", "olinda")
    assert code == 0, stderr
    assert "views: none" in stdout and "┃ view" not in stdout
    assert "V014" in stdout


def test_benchmark_refuses_a_store_in_a_missing_folder(testcity: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "nowhere" / "results.duckdb"
    args = ["benchmark", "--datasets", testcity, "--methods", "raw-poi", "--tasks", "crime", "--protocols",
            "nested", "--seeds", "0", "--store", str(store)]
    one_error(*run(capsys, monkeypatch, *args)[::2], str(store.parent), "--parents")
    assert not store.parent.exists()
    code, _, stderr = run(capsys, monkeypatch, *args, "--parents")
    assert code == 0, stderr
    assert store.is_file()


def test_messages_keep_their_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    # a failed row's reason, a path or a name may hold brackets; rich markup would drop them
    clikit.make_console().print("failed: ray is needed: pip install 'urbanprofile[ray]' ([see] data/[x].csv)")
    assert "pip install 'urbanprofile[ray]' ([see] data/[x].csv)" in capsys.readouterr().out
