"""The loopback harness reads the flwr CLI's JSON reply, not its exit code (which is 0 even when nothing answers)."""

from simulations.loopback import CONNECTION, LoopbackDeployment


def test_an_unreachable_superlink_is_a_failure_not_an_answer(tmp_path):
    deployment = LoopbackDeployment(tmp_path, ["site-0"])
    deployment.prepare(data=False)  # CLI config points at a port nothing listens on
    reply, printed = deployment.flwr_json("supernode", "list", CONNECTION)
    assert reply is None
    assert "unavailable" in printed
    assert deployment.online_nodes() == 0
