"""A deployed SuperNode starts a fresh ClientApp process for every message, so what that process imports is paid
at every stage. The key stages must not import torch or Opacus (it once crept back in through the ledger's
package, costing about 2 s a stage at each site)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.serde import recorddict_to_proto

from tests.deployed_grid import make_sites
from tests.integration.test_evil_coordinator import POLICY, _advertise, _honest

pytestmark = pytest.mark.usefixtures("flower_task_identity")
HEAVY = ("torch", "opacus", "scipy", "torchvision", "dp_accounting")

ANSWER_ONE_MESSAGE = """
import json, sys
from pathlib import Path
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as Proto
from client.app import app
content = recorddict_from_proto(Proto.FromString(Path(sys.argv[1]).read_bytes()))
node_config = json.loads(Path(sys.argv[2]).read_text())
reply = app(Message(content, 101, "train", group_id="1"), Context(run_id=1, node_id=101, node_config=node_config,
            state=RecordDict(), run_config={}))
print(json.dumps({"records": [] if reply.has_error() else sorted(reply.content.keys()),
                  "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def test_a_key_stage_is_answered_without_importing_torch_or_opacus(tmp_path: Path):
    sites = make_sites(tmp_path, 3, POLICY)
    config, model = _honest(tmp_path)
    (tmp_path / "message.bin").write_bytes(recorddict_to_proto(_advertise(config, model)).SerializeToString())
    (tmp_path / "node.json").write_text(json.dumps(sites[101]))
    done = subprocess.run([sys.executable, "-c", ANSWER_ONE_MESSAGE, str(tmp_path / "message.bin"),
                           str(tmp_path / "node.json")], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["records"] == ["secagg"]  # it advertised its keys
    assert answer["heavy"] == []
