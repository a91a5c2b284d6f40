"""Label efficiency: probes fit on shares of each outer training fold, on the protocol's own folds."""

from __future__ import annotations

import pandas as pd
import pytest

from urbanprofile.data import CityData
from urbanprofile.errors import DataError, MethodUnavailableError
from urbanprofile.evaluation import evaluate_embedding
from urbanprofile.evaluation.label_efficiency import label_efficiency
from urbanprofile.methods import get_method


@pytest.fixture
def embedding(city: CityData) -> pd.DataFrame:
    return get_method("raw-poi").build(random_state=0).fit_transform(city)


@pytest.mark.parametrize("protocol", ["nested", "spatial"])
def test_full_share_is_the_protocol_itself(city: CityData, embedding: pd.DataFrame, protocol: str) -> None:
    curve = label_efficiency(city, embedding, "crime", protocol, fractions=(0.25, 0.5, 1.0))
    full = evaluate_embedding(city, embedding, "crime", protocol)
    assert curve["fraction"].tolist() == [0.25, 0.5, 1.0]
    assert curve["r2"].iloc[-1] == pytest.approx(full.metrics["r2"])
    assert curve["n_train"].is_monotonic_increasing
    assert curve["n_train"].iloc[0] == pytest.approx(curve["n_train"].iloc[-1] / 4, abs=1.0)


def test_seeded_and_checked(city: CityData, embedding: pd.DataFrame) -> None:
    one = label_efficiency(city, embedding, "crime", fractions=(0.3,), random_state=3)
    two = label_efficiency(city, embedding, "crime", fractions=(0.3,), random_state=3)
    other = label_efficiency(city, embedding, "crime", fractions=(0.3,), random_state=4)
    assert one.equals(two) and not one["r2"].equals(other["r2"])
    with pytest.raises(DataError, match="in \\(0, 1\\]"):
        label_efficiency(city, embedding, "crime", fractions=(0.0,))
    with pytest.raises(MethodUnavailableError, match="paper"):
        label_efficiency(city, embedding, "crime", "paper")
    with pytest.raises(MethodUnavailableError, match="single-task"):
        label_efficiency(city, embedding, "crime", head="moe")
