"""UrbanFusion pretraining data-parallel on Ray Train: two local workers, DDP over gloo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from urbanprofile.data import make_synthetic_city
from urbanprofile.embedders.multimodal.pretrain_store import write_store
from urbanprofile.embedders.multimodal.urbanfusion import UrbanFusionEmbedder, city_modalities

COUNTS = ("poi", "landuse", "mobility")
SMALL = {"train_modalities": COUNTS, "epochs": 2, "batch_size": 16, "d_model": 32, "random_state": 0}

pytestmark = pytest.mark.scale  # a Ray start and two trainings: 1.5 to 4 minutes on the loaded 2-core machine


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _weights(model: UrbanFusionEmbedder) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.model_.state_dict().items()}


def test_two_ray_workers_train_the_single_process_twin(local_ray: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from urbanprofile.embedders.multimodal.ray_pretrain import pretrain_on_ray

    monkeypatch.setenv("URBANPROFILE_CACHE", str(tmp_path / "cache"))
    city = make_synthetic_city(n_regions=70, random_state=0)
    feats = city_modalities(city, COUNTS)
    store = write_store(tmp_path / "store", feats.values, feats.present)
    first = pretrain_on_ray(UrbanFusionEmbedder(**SMALL), store, num_workers=2)
    again = pretrain_on_ray(UrbanFusionEmbedder(**SMALL), store, num_workers=2)
    twin = UrbanFusionEmbedder(**SMALL, pretrain_store=str(store), shards=2).fit(city)

    assert len(first.loss_history_) == 2 and first.loss_history_[-1] < first.loss_history_[0]  # it trains
    # Seeded: two runs give the same weights (two gloo workers sum in a fixed order).
    for name, value in _weights(first).items():
        np.testing.assert_array_equal(value, _weights(again)[name], err_msg=name)
    # The single-process twin takes the same steps over the same global batches; the sums of gradients differ
    # in order (DDP's all-reduce against one backward over both halves), so the numbers agree to rounding.
    np.testing.assert_allclose(first.loss_history_, twin.loss_history_, rtol=1e-5)
    np.testing.assert_allclose(first.transform(city).to_numpy(), twin.transform(city).to_numpy(), atol=1e-4)
    d = SMALL["d_model"]
    for name, value in _weights(twin).items():
        ours = _weights(first)[name]
        if name.endswith("self_attn.in_proj_bias"):
            # The key bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by every key),
            # so Adam, which divides by the gradient's own scale, turns rounding noise into steps of size lr:
            # compare the query and value biases only.
            value, ours = np.r_[value[:d], value[2 * d:]], np.r_[ours[:d], ours[2 * d:]]
        np.testing.assert_allclose(ours, value, atol=1e-4, err_msg=name)
