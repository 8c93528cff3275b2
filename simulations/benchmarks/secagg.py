"""Secure aggregation cost, side by side: plain FedAvg, CareFed's secure aggregation, Flower 1.42's SecAgg+.

    python -m simulations.benchmarks.secagg                       # the full table (Flower at n=100, m=1e6 is slow)
    python -m simulations.benchmarks.secagg --sites 10 20 --sizes 100000 --no-flower

Every system runs the same round over the same in-process `LoopbackGrid` (a real flwr `Grid` whose
`send_and_receive` calls each site's real ClientApp, mods included, one after another), so all pay identical
message handling and none pays network or serialisation. Sites return a fixed random update (no training), so
what is measured is the protocol. One core per site; the server on one core unless the row says otherwise. Run it
with nothing else busy.

Reported per configuration (n sites, m float32 parameters, dropout fraction):
- client s: mean compute per site over all of its protocol stages (keys, shares, encoding, masking, unmasking);
- server unmask s: server compute after the last stage's replies (reconstruct secrets, remove masks, decode);
- unmask / 1-core floor: that over the time one core takes, in the same run, just to regenerate and add the
  keystreams this round's mask removal needs (the survivors' self masks and each dropped site's pairwise masks
  with its surviving neighbours);
- round s: critical path with sites working in parallel = server compute + the slowest site at each stage
  (protocol only, no training);
- x plain: (round s + T) over (plain FedAvg's round s + T), T = --train-seconds of local training (default 1 s,
  about one local DP-SGD round of the default CNN here; 0 gives the pure protocol overhead);
- upload: mean bytes a surviving site sends per round (protobuf size of its replies) over the float32 update.
Dropouts: that fraction of the sites stops answering after sharing keys (the costly case: their pairwise masks
must be reconstructed). Systems: plain FedAvg; CareFed as it was (complete graph, no identities); with enrolled
identities and the consistency check; the study default (graph chosen from the cohort size: complete up to 50
sites, beyond a SecAgg+ graph with a two-thirds threshold per neighbourhood, common.secagg.protocol) with the
server's mask removal on one core and on every core; Flower 1.42's SecAgg+ (an odd num_shares, as close to the
complete graph as it allows: even values crash its clients in 1.42).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import lru_cache, partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from client.secagg_mod import secagg_mod  # noqa: E402
from common import messages  # noqa: E402
from common.config import RunConfig, resolve  # noqa: E402
from common.logs import tidy_logging  # noqa: E402
from common.secagg.identity import IdentityVerifier, enrol_virtual_sites  # noqa: E402
from common.secagg.prg import MASK_KEY_BYTES, MaskStream, available_cores  # noqa: E402
from common.secagg.protocol import COMPLETE_GRAPH_UP_TO  # noqa: E402
from server.aggregation import DeltaSum  # noqa: E402
from server.secagg_round import SecAggRound  # noqa: E402
from server.training import request_content, secagg_for_cohort  # noqa: E402

UPDATE_NORM = 1.0  # L2 norm of each site's random update (well inside every system's bound)


@dataclass
class Ledger:
    """What the grid saw in one round."""

    client_seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    stage_max: list[float] = field(default_factory=list)
    upload_bytes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    stage_ends: list[float] = field(default_factory=list)
    harness_seconds: float = 0.0  # copying messages in and out (a transport's job, not the systems')


class LoopbackGrid(Grid):
    """A Grid that hands each message to the node's ClientApp in this process and times it."""

    def __init__(self, app: ClientApp, nodes: Iterable[int], drop_at_stage: dict[int, int]) -> None:
        self.app = app
        self.nodes = list(nodes)
        self.contexts = {u: Context(run_id=1, node_id=u, node_config={"partition-id": i}, state=RecordDict(),
                                    run_config={}) for i, u in enumerate(self.nodes)}
        self.drop_at_stage = drop_at_stage
        self.stage = 0
        self.ledger = Ledger()
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def start_round(self) -> None:
        self.stage = 0
        self.ledger = Ledger()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver a serialised copy of each message (as a real transport would), time the site, copy back."""
        replies, slowest = [], 0.0
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.drop_at_stage.get(node, 99) <= self.stage:
                continue  # this site has dropped out
            copying = time.perf_counter()
            delivered = Message(recorddict_from_proto(recorddict_to_proto(msg.content)), node,
                                msg.metadata.message_type, group_id=msg.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = f"{self.stage}-{node}"
            started = time.perf_counter()
            reply = self.app(delivered, self.contexts[node])
            elapsed = time.perf_counter() - started
            if not reply.has_error():
                proto = recorddict_to_proto(reply.content)
                self.ledger.upload_bytes[node] += proto.ByteSize()
                reply = Message(recorddict_from_proto(proto), reply_to=delivered)
            self.ledger.harness_seconds += time.perf_counter() - copying - elapsed
            self.ledger.client_seconds[node] += elapsed
            slowest = max(slowest, elapsed)
            replies.append(reply)
        self.ledger.stage_max.append(slowest)
        self.ledger.stage_ends.append(time.perf_counter())
        self.stage += 1
        return replies


@lru_cache(maxsize=1)
def base_config() -> RunConfig:
    """Read pyproject.toml once: the benchmark runs for a long time and must not see later edits."""
    return resolve(overrides={"update-clip-norm": 2 * UPDATE_NORM, "secagg-max-weight": 1000,
                              "secagg-min-cohort": 2, "run-name": "secagg-benchmark",
                              "secagg-identities": False})  # the identities arm turns them on


@lru_cache(maxsize=256)
def random_update(m: int, seed: int) -> np.ndarray:
    """A site's fixed update (cached, and made before the round: no system pays for it)."""
    x = np.random.default_rng(seed).standard_normal(m).astype(np.float32)
    x *= np.float32(UPDATE_NORM / np.linalg.norm(x))
    x.flags.writeable = False
    return x


def prepare_updates(m: int, nodes: Iterable[int]) -> None:
    random_update.cache_clear()
    for node in nodes:
        random_update(m, node)


# -- CareFed (plain FedAvg and secure aggregation share the same site) -------------------------------------------

def carefed_app(m: int) -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = context.node_id
        return Message(RecordDict({
            messages.STATUS: ConfigRecord({"state": messages.STATE_TRAINED, "reason": ""}),
            messages.UPDATE: ArrayRecord({"w": Array(random_update(m, node))}),
            messages.TRAIN_METRICS: MetricRecord({"site": node, "num-examples": 100, "steps": 1,
                                                  "update-clipped": 0}),
        }), reply_to=msg)

    return app


@lru_cache(maxsize=16)
def enrolled(n: int) -> tuple[str, IdentityVerifier]:
    """n virtual sites enrolled by a throwaway study CA (as a simulation does), under a temporary run folder."""
    root = Path(tempfile.mkdtemp(prefix="carefed-secagg-benchmark-"))
    study = base_config().study_id
    enrolment = enrol_virtual_sites(n, study, root / base_config().run_name / "identities")
    return str(root), IdentityVerifier(enrolment.ca_cert.read_bytes(), study)


@dataclass(frozen=True)
class CareFedSystem:
    """One CareFed arm: plain or secure; graph degree (None: chosen from the cohort size, the study default);
    enrolled identities with the consistency check; threads for the server's mask removal (None: every core)."""

    secure: bool = True
    degree: int | None = None
    identities: bool = True
    server_workers: int | None = 1

    def config(self, n: int, fraction: float) -> RunConfig:
        config = base_config().replace(secagg=self.secure, num_sites=n, secagg_dropout_rate=max(0.1, fraction),
                                       secagg_graph_degree=self.degree or 0)
        if self.degree is None:
            config = secagg_for_cohort(config, n)
        if self.identities:
            output_dir, _ = enrolled(n)
            config = config.replace(secagg_identities=True, output_dir=output_dir)
        return config


def carefed_round(n: int, m: int, dropped: dict[int, int], system: CareFedSystem,
                  train_seconds: float) -> dict[str, Any]:
    """One CareFed round over the loopback grid; checks the aggregate against the survivors' mean."""
    nodes = list(range(1, n + 1))
    prepare_updates(m, nodes)
    grid = LoopbackGrid(carefed_app(m), nodes, dropped)
    config = system.config(n, max(0.1, len(dropped) / n))
    content = request_content(config.site_request(num_classes=10, channels=1, image_size=28), 1,
                              ArrayRecord({"w": Array(np.zeros(m, np.float32))}), simulation=config)
    grid.start_round()
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if system.secure:
        verifier = enrolled(n)[1] if system.identities else None
        secure = SecAggRound(grid, config, 1, content, m, lambda node, reply: None, verifier, system.server_workers)
        outcome = secure.run(nodes)
        if outcome.aborted:
            raise RuntimeError(f"CareFed secure aggregation aborted: {outcome.aborted}")
        mean = outcome.total.mean()
        extra = {"graph_degree": secure.protocol.graph_degree, "masks_removed": secure.session.masks_removed}
    else:
        total = DeltaSum()
        replies = grid.send_and_receive([Message(content, node, MessageType.TRAIN, group_id="1") for node in nodes])
        for reply in replies:
            total.add(reply.content[messages.UPDATE]["w"].numpy(), 100, False)
        mean = total.mean()
    finished = time.perf_counter()
    survivors = [u for u in nodes if u not in dropped]
    expected = np.mean([random_update(m, u) for u in survivors], axis=0)
    if not np.allclose(mean, expected, atol=1e-4):
        raise RuntimeError("aggregate does not match the survivors' mean")
    result = summarise(grid.ledger, started, finished, m, train_seconds, survivors)
    if extra:
        extra["keystream_floor_s"] = keystream_floor(extra["masks_removed"], m + 2)
    return {**result, **extra}


def keystream_floor(streams: int, length: int) -> float:
    """One core regenerating `streams` mask keystreams (the protocol's AES-128-CTR) of `length` words and adding them
    to a vector: the least any mask removal must spend (the seeds themselves come free here)."""
    stream, acc = MaskStream(length, MASK_KEY_BYTES), np.zeros(length, np.uint32)
    seeds = [os.urandom(32) for _ in range(streams)]
    started = time.perf_counter()
    for seed in seeds:
        stream.add(acc, seed)
    return time.perf_counter() - started


# -- Flower 1.42 SecAgg+ (legacy API: DefaultWorkflow + SecAggPlusWorkflow, NumPyClient + secaggplus_mod) --------

def flower_round(n: int, m: int, dropped: dict[int, int], train_seconds: float) -> dict[str, Any]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Site(NumPyClient):
        def __init__(self, node: int) -> None:
            self.update = random_update(m, node)

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            return [self.update], 100, {}

    app = ClientApp(client_fn=lambda context: Site(context.node_id).to_client(), mods=[secaggplus_mod])
    nodes = list(range(1, n + 1))
    prepare_updates(m, nodes)
    grid = LoopbackGrid(app, nodes, dropped)
    shares = n if n % 2 else n - 1  # odd, as close to the complete graph as Flower allows
    # the same dropout tolerance CareFed's default gives (10% of the cohort), and a majority; Flower needs t < shares
    threshold = min(max(shares - math.ceil(0.1 * n), shares // 2 + 1), shares - 1)
    secure = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=1000.0)
    timing: dict[str, float] = {}

    def timed_fit(grid_: Grid, context: Context) -> None:
        grid.start_round()
        timing["start"] = time.perf_counter()
        secure(grid_, context)
        timing["end"] = time.perf_counter()

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([np.zeros(m, np.float32)]))
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=timed_fit)(grid, context)
    mean = context.state.array_records["parameters"].to_numpy_ndarrays()[0]
    survivors = [u for u in nodes if u not in dropped]
    expected = np.mean([random_update(m, u) for u in survivors], axis=0)
    if not np.allclose(mean, expected, atol=1e-4):
        raise RuntimeError("Flower's aggregate does not match the survivors' mean (the round failed)")
    return summarise(grid.ledger, timing["start"], timing["end"], m, train_seconds, survivors)


def summarise(ledger: Ledger, started: float, finished: float, m: int, train_seconds: float,
              survivors: Iterable[int]) -> dict[str, Any]:
    client_total = sum(ledger.client_seconds.values())
    uploads = [ledger.upload_bytes[u] for u in survivors]
    server_compute = (finished - started) - client_total - ledger.harness_seconds
    last_stage_end = ledger.stage_ends[-1] if ledger.stage_ends else started
    sites = len(ledger.client_seconds)
    return {
        "client_s": client_total / sites,
        "server_unmask_s": finished - last_stage_end,
        "server_s": server_compute,
        "round_s": server_compute + sum(ledger.stage_max),
        "round_with_training_s": server_compute + sum(ledger.stage_max) + train_seconds,
        "upload_bytes": sum(uploads) / len(uploads),
        "upload_ratio": sum(uploads) / len(uploads) / (4 * m),
    }


def dropouts(n: int, fraction: float, stage: int) -> dict[int, int]:
    """The last `fraction` of the sites drop before `stage` (0-based: 2 = after sharing keys)."""
    count = int(round(n * fraction))
    return {u: stage for u in range(n - count + 1, n + 1)}


def systems_for(n: int, flower: bool) -> list[tuple[str, Callable[..., dict[str, Any]]]]:
    """The arms of one configuration: plain first (the ratio's denominator), then CareFed as it was (complete graph,
    no identities), the complete graph with identities, the study default (graph from the cohort size), the same
    with the server on every core, and Flower's SecAgg+."""
    arms = [("plain FedAvg", CareFedSystem(secure=False, identities=False)),
            ("CareFed secagg, no identities", CareFedSystem(degree=0, identities=False)),
            ("CareFed + identities + consistency check", CareFedSystem(degree=0))]
    if n > COMPLETE_GRAPH_UP_TO:
        arms.append(("CareFed default + identities + consistency check", CareFedSystem(degree=None)))
    cores = available_cores()
    if cores > 1:
        arms.append((f"CareFed default, server on {cores} cores", CareFedSystem(degree=None, server_workers=None)))
    systems: list[tuple[str, Callable[..., dict[str, Any]]]] = [
        (name, partial(carefed_round, system=system)) for name, system in arms]
    if flower:
        systems.append(("Flower 1.42 SecAgg+", flower_round))
    return systems


def run_configuration(n: int, m: int, fraction: float, train_seconds: float, flower: bool) -> list[dict[str, Any]]:
    """Every system on one (n, m, dropout) configuration, printed as table rows as they finish."""
    rows: list[dict[str, Any]] = []
    dropped = dropouts(n, fraction, stage=2)
    plain_round = None
    for name, measure in systems_for(n, flower):
        drops = dropped if plain_round else dict.fromkeys(dropped, 0)  # plain FedAvg: the dropped never answer
        try:
            result = measure(n, m, drops, train_seconds=train_seconds)
        except RuntimeError as err:  # an aborted round is a result too: say so and go on
            print(f"| {n} | {m:.0e} | {fraction:.0%} | {name} | aborted: {err} ||||||", flush=True)
            rows.append({"n": n, "m": m, "dropout": fraction, "system": name, "aborted": str(err)})
            continue
        plain_round = plain_round or result["round_with_training_s"]
        row = {"n": n, "m": m, "dropout": fraction, "system": name, **result,
               "x_plain": result["round_with_training_s"] / plain_round}
        rows.append(row)
        degree = row.get("graph_degree")
        graph = "" if degree is None else "complete" if degree == 0 else f"k={degree}"
        floor = f"{row['server_unmask_s'] / row['keystream_floor_s']:.2f}" if row.get("keystream_floor_s") else ""
        print(f"| {n} | {m:.0e} | {fraction:.0%} | {name} | {graph} | {row['client_s']:.4f} | "
              f"{row['server_unmask_s']:.4f} | {floor} | {row['round_s']:.3f} | {row['x_plain']:.2f} | "
              f"{row['upload_ratio']:.3f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+ (slow at large n, m)")
    parser.add_argument("--train-seconds", type=float, default=1.0,
                        help="local training time added to every system's critical path (about one local round "
                             "of the default CNN here); 0 gives the pure protocol overhead")
    parser.add_argument("--json", type=str, default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    base_config()
    tidy_logging()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as Flower's runtime sets them
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)

    rows = []
    print("| n | m | dropout | system | graph | client s | server unmask s | unmask / 1-core floor | round s | "
          "x plain | upload / float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.sizes:
        for n in args.sites:
            for fraction in args.dropouts:
                rows += run_configuration(n, m, fraction, args.train_seconds, flower=not args.no_flower)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train_seconds": args.train_seconds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
