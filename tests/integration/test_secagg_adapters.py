"""The Flower adapters (client mod + server round) with real ClientApps on a loopback Grid, dropouts at each stage."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from common import messages
from common.config import resolve
from server.secagg_round import SecAggRound
from server.training import request_content
from simulations.benchmarks import secagg as bench

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity

M = 64




def _round(n: int, drop_at_stage: dict[int, int], dropout_rate: float = 0.3):
    nodes = list(range(1, n + 1))
    grid = bench.LoopbackGrid(bench.carefed_app(M), nodes, drop_at_stage)
    config = resolve(overrides={"num-sites": n, "update-clip-norm": 2.0, "secagg-max-weight": 1000,
                                "secagg-dropout-rate": dropout_rate, "run-name": "adapters",
                                "secagg-identities": False})
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord({"w": bench.Array(np.zeros(M, np.float32))}), simulation=config)
    seen = []
    outcome = SecAggRound(grid, config, 1, content, M, lambda node, reply: seen.append(node)).run(nodes)
    return outcome, grid, seen


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_dropout_at_any_stage_still_gives_the_survivors_mean(stage: int):
    outcome, grid, _ = _round(10, {3: stage, 7: stage})
    assert outcome.aborted == ""
    contributors = [u for u in range(1, 11) if u not in (3, 7)] if stage <= 2 else list(range(1, 11))
    expected = np.mean([bench.random_update(M, u) for u in contributors], axis=0)
    np.testing.assert_allclose(outcome.total.mean(), expected, atol=1e-4)
    assert outcome.total.weight == 100 * len(contributors)
    # sites that finished the round deleted their session secrets from Context.state
    finished = [u for u in range(1, 11) if u not in (3, 7)]
    assert all("carefed.secagg-session" not in grid.contexts[u].state for u in finished)


def test_too_many_dropouts_abort_the_round_cleanly():
    outcome, _, _ = _round(10, {u: 2 for u in (1, 2, 3, 4)}, dropout_rate=0.1)
    assert "NOT_ENOUGH_SURVIVORS" in outcome.aborted
    assert outcome.total.contributors == 0


def test_the_server_receives_only_masked_uint32_vectors_of_the_model_size_plus_two():
    captured = []
    original = bench.LoopbackGrid.send_and_receive

    def spy(self, msgs, *, timeout=None):
        replies = list(original(self, msgs, timeout=timeout))
        captured.extend(replies)
        return replies

    bench.LoopbackGrid.send_and_receive = spy
    try:
        outcome, _, _ = _round(5, {})
    finally:
        bench.LoopbackGrid.send_and_receive = original
    assert outcome.aborted == ""
    arrays = [arr.numpy() for r in captured for rec in r.content.array_records.values() for arr in rec.values()]
    assert arrays and all(a.dtype == np.uint32 and a.shape == (M + 2,) for a in arrays)
    assert not any(messages.UPDATE in r.content for r in captured)
    for reply in captured:
        metrics = reply.content.get(messages.TRAIN_METRICS)
        assert metrics is None or "num-examples" not in metrics
