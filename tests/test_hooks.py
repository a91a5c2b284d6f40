"""The optional embedder hooks are explicit protocols (embedders/base.py), not attribute probes: epochs reported
to a progress bar (ReportsEpochs) and candidate embeddings for the protocol to choose among (KeepsCandidates)."""

from __future__ import annotations

from urbanprofile.data import CityData
from urbanprofile.embedders.base import KeepsCandidates, ReportsEpochs, candidates_of
from urbanprofile.embedders.baselines.pca import PCAEmbedder
from urbanprofile.embedders.baselines.with_raw import WithRawFeatures
from urbanprofile.embedders.multiview.mvure import MVUREEmbedder
from urbanprofile.methods import get_method, list_methods

SMALL_MVURE = {"d": 8, "n_heads": 2, "epochs": 4}

#: The methods trained in epochs; a progress bar follows exactly these.
TRAINED = {"autoencoder", "mvure", "mgfn", "hafusion", "srel", "srel-deep", "urbanfusion", "urbanvlp",
           "hafusion+raw", "srel+raw"}


def test_the_methods_trained_in_epochs_are_the_ones_that_report_them() -> None:
    reporting = {name for name in list_methods() if isinstance(get_method(name).build(random_state=0), ReportsEpochs)}
    assert reporting == TRAINED


def test_a_method_without_checkpoints_keeps_no_candidates(city: CityData) -> None:
    pca = PCAEmbedder(n_components=4, random_state=0).fit(city)
    assert not isinstance(pca, KeepsCandidates) and candidates_of(pca) is None


def test_a_multiview_method_keeps_its_checkpoints_once_fitted(city: CityData) -> None:
    model = MVUREEmbedder(**SMALL_MVURE, random_state=0)
    assert candidates_of(model) is None  # nothing before fit
    model.fit(city)
    candidates = candidates_of(model)
    assert candidates is not None and "epoch 4" in candidates
    final = model.transform(city)
    for frame in candidates.values():
        assert frame.index.equals(final.index) and list(frame.columns) == list(final.columns)


def test_learned_beside_raw_passes_both_hooks_through(city: CityData) -> None:
    seen: list[tuple[int, int]] = []
    model = WithRawFeatures(learned="urbanprofile.embedders.multiview.mvure:MVUREEmbedder",
                            learned_params=SMALL_MVURE, random_state=0)
    model.on_epoch = lambda epoch, total: seen.append((epoch, total))
    model.fit(city)
    assert seen == [(e, 4) for e in range(1, 5)]
    candidates = candidates_of(model)
    assert candidates is not None and candidates.keys() == candidates_of(model.learned_).keys()  # type: ignore[union-attr]
    assert all(any(c.startswith("raw_") for c in frame.columns) for frame in candidates.values())
