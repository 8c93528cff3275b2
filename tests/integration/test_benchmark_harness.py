"""The secure-aggregation benchmark's harness stays runnable and its systems stay correct (tiny sizes, no timing)."""

import pytest

from simulations.benchmarks import secagg as bench

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity




@pytest.mark.parametrize("secure", [False, True])
def test_carefed_round_on_the_loopback_grid_aggregates_the_survivors(secure: bool):
    dropped = bench.dropouts(10, 0.1, stage=2) if secure else {}
    result = bench.carefed_round(10, 500, dropped, secure, 0, 0.1, 0.0)  # raises if the mean is wrong
    assert result["upload_bytes"] > 4 * 500
    assert result["client_s"] > 0 and result["round_s"] > 0


def test_flower_secaggplus_runs_on_the_same_grid():
    result = bench.flower_round(5, 300, {}, 0.0)
    assert result["upload_ratio"] > 1.5  # int64 on the wire: about twice the float32 update
