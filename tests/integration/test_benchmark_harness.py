"""The secure-aggregation benchmark's harness stays runnable and its systems stay correct (tiny sizes, no timing)."""

import pytest

from simulations.benchmarks import secagg as bench

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # messages need a task identity




@pytest.mark.parametrize("secure", [False, True])
def test_carefed_round_on_the_loopback_grid_aggregates_the_survivors(secure: bool):
    dropped = bench.dropouts(10, 0.1, stage=2) if secure else {}
    system = bench.CareFedSystem(secure=secure, identities=secure)
    result = bench.carefed_round(10, 500, dropped, system, 0.0)  # raises if the mean is wrong
    assert result["upload_bytes"] > 4 * 500
    assert result["client_s"] > 0 and result["round_s"] > 0


def test_a_large_cohort_gets_a_sparse_graph_by_default_and_still_aggregates_the_survivors():
    dropped = bench.dropouts(60, 0.1, stage=2)
    result = bench.carefed_round(60, 200, dropped, bench.CareFedSystem(degree=None, server_workers=None), 0.0)
    assert 0 < result["graph_degree"] < 59
    # self masks of the 54 survivors, and each dropped site's pairwise masks with its surviving neighbours
    assert 54 < result["masks_removed"] <= 54 + 6 * result["graph_degree"]


def test_flower_secaggplus_runs_on_the_same_grid():
    result = bench.flower_round(5, 300, {}, 0.0)
    assert result["upload_ratio"] > 1.5  # int64 on the wire: about twice the float32 update
