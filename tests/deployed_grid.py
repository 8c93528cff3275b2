"""Deployed-style hospitals in this process: the real ClientApp (client.app:app, every mod) behind a Grid.

Each site has what a partner site's SuperNode has: `site-id`, its own image files (`data`), its own state folder
and its own policy file, and no `partition-id` (so it is not a simulated site: no faults, no seeded noise, no
simulation section accepted). Messages are serialised and parsed on the way in and out, as a transport would.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from common.config import resolve
from common.deploy.demo_data import write_site_folders
from common.policy import SitePolicy, policy_text
from common.secagg.identity import enrol_virtual_sites
from simulations.benchmarks.secagg import LoopbackGrid

FIRST_NODE = 101


STUDIES = ("carefed-demo", "carefed-demo-2")


def make_sites(root: Path, count: int, policy: SitePolicy | None = None) -> dict[int, dict[str, object]]:
    """Image folders, state folders, policy files and enrolled identities (one per study, each study its own CA)
    for `count` hospitals; node id -> node config."""
    names = [f"site-{k}" for k in range(count)]
    if not (root / "data").exists():
        write_site_folders(resolve(), root / "data", names)
        for study in STUDIES:
            enrolment = enrol_virtual_sites(count, study, root / "enrolment" / study, days=2)
            for k, folder in enumerate(enrolment.site_folders):
                (root / "identities" / names[k]).mkdir(parents=True, exist_ok=True)
                folder.rename(root / "identities" / names[k] / study)
    sites = {}
    for k, name in enumerate(names):
        policy_file = root / "policies" / f"{name}.toml"
        policy_file.parent.mkdir(parents=True, exist_ok=True)
        policy_file.write_text(policy_text(policy or SitePolicy(studies=("carefed-demo",)), policy_file))
        sites[FIRST_NODE + k] = {"site-id": k, "data": str(root / "data" / name),
                                 "state-dir": str(root / "state" / name), "policy": str(policy_file),
                                 "identity": str(root / "identities" / name)}
    return sites


class DeployedGrid(LoopbackGrid):
    """A Grid whose nodes are deployed-style ClientApps; every reply is kept in `replies` for inspection."""

    def __init__(self, sites: dict[int, dict[str, object]]) -> None:
        super().__init__(client_app, list(sites), {})
        self.contexts = {u: Context(run_id=1, node_id=u, node_config=dict(config), state=RecordDict(),
                                    run_config={}) for u, config in sites.items()}
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def mutated(content: RecordDict, mutate: dict | None) -> RecordDict:
    """A request with the coordinator's edits: record name -> keys to set (None: drop the record)."""
    for name, values in (mutate or {}).items():
        if values is None:
            del content[name]
        elif name in content:
            content[name] = ConfigRecord({**dict(content[name]), **values})
        else:
            content[name] = ConfigRecord(values)
    return content
