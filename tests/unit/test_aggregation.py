import numpy as np
import pytest

from server.aggregation import apply_delta, weighted_mean_delta


def test_weighted_mean_weights_by_examples():
    a = {"w": np.array([1.0, 0.0], np.float32)}
    b = {"w": np.array([4.0, 3.0], np.float32)}
    mean = weighted_mean_delta([(a, 100), (b, 300)])
    np.testing.assert_allclose(mean["w"], [3.25, 2.25])
    assert mean["w"].dtype == np.float32


def test_apply_delta_adds_keywise():
    out = apply_delta({"w": np.ones(3, np.float32)}, {"w": np.full(3, 0.5, np.float32)})
    np.testing.assert_allclose(out["w"], 1.5)


def test_mismatched_updates_are_refused():
    with pytest.raises(ValueError, match="differ"):
        weighted_mean_delta([({"w": np.zeros(1)}, 1), ({"v": np.zeros(1)}, 1)])
    with pytest.raises(ValueError, match="weights must be positive"):
        weighted_mean_delta([({"w": np.zeros(1)}, 0)])
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean_delta([])
