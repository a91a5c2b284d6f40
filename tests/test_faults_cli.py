"""The CLI's surface as a new user meets it: tables that fit the terminal, help, output paths, messages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from urbanprofile import cli
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
    text = render(cli._leaderboard_table(rows, "leaderboard (mean ± std over seeds)"), width)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    cells = shown_cells(text)
    for r in leaderboard(rows).to_dict("records"):
        assert r["method"] in cells  # names are whole cells, or said whole in a table's title
        assert f"dataset {r['dataset']}" in text.replace("\n", " ") or r["dataset"] in cells
        assert format_mean_std(r["r2_mean"], r["r2_std"]) in cells  # the figure that matters, whole
        assert f"{r['worst_block_r2_mean']:.3f}" in cells
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
    monkeypatch.setattr(sys, "argv", ["urbanprofile", *args])
    monkeypatch.setattr(cli, "out", Console(width=width))
    monkeypatch.setattr(cli, "err", Console(width=width, stderr=True))
    monkeypatch.setenv("COLUMNS", str(width))
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
