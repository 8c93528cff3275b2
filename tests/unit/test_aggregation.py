import numpy as np
import pytest

from common.update_codec import clip_l2, flatten, unflatten
from server.aggregation import DeltaSum, ModelAverage, ServerOptimizer, apply_mean_delta


def test_mean_is_weighted_by_examples():
    total = DeltaSum()
    total.add(np.array([1.0, 0.0]), 100, clipped=False)
    total.add(np.array([4.0, 3.0]), 300, clipped=True)
    np.testing.assert_allclose(total.mean(), [3.25, 2.25])
    assert (total.weight, total.clipped, total.contributors) == (400, 1, 2)


def test_apply_mean_delta_keeps_shapes_and_dtypes():
    weights = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    out = apply_mean_delta(weights, np.arange(7, dtype=np.float64))
    np.testing.assert_allclose(out["a"], [[1, 2], [3, 4]])
    np.testing.assert_allclose(out["b"], [4, 5, 6])
    assert out["a"].dtype == np.float32 and out["b"].shape == (3,)


def test_flatten_round_trips_and_clip_bounds_the_norm():
    delta = {"w": np.array([[3.0, 4.0]], np.float32), "b": np.array([0.0], np.float32)}
    flat = flatten(delta)
    assert np.array_equal(unflatten(flat, delta)["w"], delta["w"])
    clipped, hit = clip_l2(flat, 1.0)
    assert hit and np.linalg.norm(clipped) == pytest.approx(1.0)
    same, hit = clip_l2(flat, 10.0)
    assert not hit and np.array_equal(same, flat)


def test_bad_updates_are_refused():
    total = DeltaSum()
    with pytest.raises(ValueError, match="weights must be positive"):
        total.add(np.zeros(2), 0, clipped=False)
    total.add(np.zeros(2), 1, clipped=False)
    with pytest.raises(ValueError, match="expected 2"):
        total.add(np.zeros(3), 1, clipped=False)
    with pytest.raises(ValueError, match="no updates"):
        DeltaSum().mean()


def test_the_server_optimizers_take_their_published_steps():
    weights = {"w": np.zeros(3, dtype=np.float32)}
    first, second = np.array([1.0, -2.0, 0.5]), np.array([0.5, 0.5, -1.0])
    fedavg = ServerOptimizer("fedavg", learning_rate=1.0)
    np.testing.assert_allclose(fedavg.step(weights, first)["w"], apply_mean_delta(weights, first)["w"])

    momentum = ServerOptimizer("fedavgm", learning_rate=0.5, momentum=0.9)
    after_one = momentum.step(weights, first)
    after_two = momentum.step(after_one, second)
    np.testing.assert_allclose(after_two["w"], 0.5 * first + 0.5 * (0.9 * first + second), rtol=1e-6)

    adam = ServerOptimizer("fedadam", learning_rate=0.1, momentum=0.9, second_moment=0.99, adaptivity=1e-3)
    step = adam.step(weights, first)["w"]
    np.testing.assert_allclose(step, 0.1 * 0.1 * first / (np.sqrt(0.01 * first**2) + 1e-3), rtol=1e-6)
    assert set(adam.state) == {"first", "second"}  # what a checkpoint keeps to resume from
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("sgd").step(weights, first)


def test_the_model_average_is_the_bias_corrected_moving_average_of_the_global_models():
    models = [np.array([1.0, 2.0]), np.array([3.0, -2.0]), np.array([0.0, 4.0])]
    average = ModelAverage(decay=0.5)
    results = [average.update({"w": m.astype(np.float32)})["w"] for m in models]
    np.testing.assert_allclose(results[0], models[0])  # no pull towards zero (or the initial model) at round 1
    expected = (0.25 * models[0] + 0.5 * models[1] + models[2]) / 1.75
    np.testing.assert_allclose(results[2], expected, rtol=1e-6)
    assert results[2].dtype == np.float32 and set(average.state) == {"sum", "weight"}
