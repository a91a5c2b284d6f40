"""Epochs of learned methods reach the progress display: the multi-view loop, the autoencoder, serial and --jobs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from urbanprofile.benchmark.executors import ProcessExecutor
from urbanprofile.benchmark.runner import UnitProgress
from urbanprofile.benchmark.unit import Unit, run_unit
from urbanprofile.data import CityData
from urbanprofile.embedders.baselines.autoencoder import AutoencoderEmbedder
from urbanprofile.methods import MethodSpec

CELLS = (("crime", "nested", "ridge"),)
AUTOENCODER = MethodSpec("autoencoder-small", "urbanprofile.embedders.baselines.autoencoder:AutoencoderEmbedder",
                         {"n_components": 4, "hidden": 16, "epochs": 5}, stochastic=True)
MVURE = MethodSpec("mvure-small", "urbanprofile.embedders.multiview.mvure:MVUREEmbedder",
                   {"d": 8, "n_heads": 2, "epochs": 4}, stochastic=True)


def test_the_autoencoder_reports_every_epoch(city: CityData) -> None:
    seen: list[tuple[int, int]] = []
    model = AutoencoderEmbedder(n_components=4, hidden=16, epochs=6, random_state=0)
    model.on_epoch = lambda epoch, total: seen.append((epoch, total))
    model.fit(city)
    assert seen == [(e, 6) for e in range(1, 7)]


@pytest.mark.parametrize("spec", [AUTOENCODER, MVURE], ids=lambda s: s.name)
def test_a_serial_unit_passes_its_epochs_on(city: CityData, spec: MethodSpec) -> None:
    seen: list[tuple[str, int, int]] = []
    rows, _ = run_unit(Unit("synthetic", spec, 0, CELLS), city, on_epoch=lambda u, e, t: seen.append((u.label, e, t)))
    total = spec.params["epochs"]
    assert [r["status"] for r in rows] == ["ok"]
    assert seen == [(f"synthetic {spec.name} seed 0", e, total) for e in range(1, total + 1)]


def test_worker_processes_send_the_epochs_of_their_units(city: CityData) -> None:
    units = [Unit("synthetic", AUTOENCODER, seed, CELLS) for seed in (0, 1)]
    seen: list[tuple[str, int, int]] = []
    results = list(ProcessExecutor(jobs=1).run(units, {"synthetic": city},
                                               on_epoch=lambda u, e, t: seen.append((u.label, e, t))))
    assert [r["status"] for _, rows, _ in results for r in rows] == ["ok", "ok"]
    # Sent at most every 0.2 s, and always the last epoch: each unit's bar ends full.
    for unit in units:
        mine = [(e, t) for label, e, t in seen if label == unit.label]
        assert mine and mine[-1] == (5, 5) and all(t == 5 for _, t in mine)


def test_one_epoch_bar_per_unit_in_training_and_none_after_it_finished() -> None:
    first, second = (Unit("synthetic", AUTOENCODER, seed, CELLS) for seed in (0, 1))
    shown = UnitProgress("processes", [first, second])
    shown.console = Console(file=io.StringIO(), force_terminal=True)
    shown.live = True
    with shown:
        shown.epoch(first, 1, 5)
        shown.epoch(second, 2, 5)
        assert len(shown._bar.tasks) == 3  # the units and one epoch bar per unit in training
        shown.unit_done(first, [])
        shown.epoch(first, 5, 5)  # a worker's last epoch that arrives after its rows
        assert [t.description for t in shown._bar.tasks][1:] == ["  synthetic autoencoder-small seed 1: epoch"]
        assert shown._bar.tasks[1].completed == 2
