"""The federated training loop on Flower's Message API: sample sites, train, aggregate, evaluate, record."""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.exit import add_exit_handler
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common import messages
from common.config import RunConfig
from common.data.site import check_partitions, global_model, load_source_for, resolve_partitioning, to_tensor
from common.evaluation import evaluate_model
from common.models import count_parameters, trained_module, trained_part
from common.replies import ReplyRefused, check_reply, stage_of
from common.secagg.identity import IdentityVerifier, enrol_virtual_sites
from common.secagg.protocol import graph_for_cohort
from common.study import SiteRequest
from common.update_codec import flatten
from server.aggregation import DeltaSum, ModelAverage, ServerOptimizer
from server.exchange import STOP, RunInterrupted, send_and_receive
from server.run_folder import RunFolder, with_run_name
from server.secagg_round import Advertised, NextRound, SecAggRound, protocol_config

NODE_WAIT_SECONDS = 120.0
# A site whose SuperNode crashed or restarted is offline until it reconnects (Flower readmits a crashed node after
# two missed heartbeats, then its restarted process activates again): a round waits this long for it, not forever.
REJOIN_SECONDS = 90.0


@dataclass
class RoundOutcome:
    total: DeltaSum = field(default_factory=DeltaSum)
    trained: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)  # node ids that refused (budget or policy)
    failed: list[int] = field(default_factory=list)
    secagg_aborted: str = ""
    secagg_dropped: dict[str, list[int]] = field(default_factory=dict)
    evaluated: dict[int, float] = field(default_factory=dict)  # site -> accuracy of the model it received
    exchanges: int = 0  # message exchanges with the sites in the round (each waits for every asked site)


def request_content(request: SiteRequest, server_round: int, model: ArrayRecord, *,
                    simulation: RunConfig | None = None) -> RecordDict:
    """What a site receives each round: the request's sections, the round, the global model (and, for the
    simulation engine's virtual sites only, the whole run config)."""
    content = RecordDict({name: ConfigRecord(values) for name, values in request.records().items()})
    if simulation is not None:
        content[messages.SIMULATION] = ConfigRecord(simulation.to_mapping())
    content[messages.ROUND] = ConfigRecord({"round": server_round})
    content[messages.GLOBAL_MODEL] = model
    return content


def secagg_for_cohort(config: RunConfig, cohort_size: int) -> RunConfig:
    """The round's secure-aggregation graph and threshold: as configured, or chosen from the cohort's size."""
    degree, rate = graph_for_cohort(cohort_size, config.secagg_graph_degree, config.secagg_dropout_rate,
                                    config.secagg_colluding)
    return config.replace(secagg_graph_degree=degree, secagg_dropout_rate=rate)


class FederatedTraining:
    """One run: owns the global model, the cohort sampler and the run folder."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config = resolve_partitioning(with_run_name(config))
        source = load_source_for(config)  # fails early, before any folder exists, on bad data
        check_partitions(config, source)
        torch.manual_seed(config.seed)
        self.model = global_model(config, source)
        channels, image_size, _ = source.image_shape
        self.site_shape = {"num_classes": source.num_classes, "channels": channels, "image_size": image_size}
        self.request = config.site_request(**self.site_shape)
        # Virtual sites (Flower's in-memory grid) also get the whole run config: their partitions, faults, run
        # folder. A deployed site refuses any request that carries it.
        self.simulated = isinstance(grid, InMemoryGrid)
        self.parent_pid = os.getppid()  # deployed: Flower's SuperExec, which the SuperLink runs
        self.closed = False  # the run folder has its final state (finished or failed)
        self.advertised: Advertised | None = None  # sites' keys for the next round, sent with this round's unmask
        self.exchanges = 0  # message exchanges of this run so far (secure aggregation's stages count in theirs)
        # The global test set, as the model's trained part sees it (ScatterNet's fixed features: computed once)
        self.scored, self.test_x = trained_part(self.model, to_tensor(source.test.images))
        self.test_y = torch.from_numpy(source.test.labels)
        self.rng = random.Random(config.seed)
        self.exhausted: set[int] = set()  # node ids whose privacy budget cannot afford another round
        self.gone: set[int] = set()  # node ids offline past a whole rejoin wait, and not seen online since
        self.node_site: dict[int, int] = {}
        self.folder = RunFolder.create(config)
        self.identity_verifier = self._identities()
        self.server_optimizer = ServerOptimizer(config.server_optimizer, config.server_learning_rate,
                                                config.server_momentum)
        # parameter averaging (server-averaging > 0): a second model, scored on the same test set and saved beside
        self.average = ModelAverage(config.server_averaging) if config.server_averaging else None
        self.averaged = copy.deepcopy(self.model) if self.average else None
        self.averaged_scored = trained_module(self.averaged) if self.averaged else None  # inputs as self.scored

    def _identities(self) -> IdentityVerifier | None:
        """Simulation: enrol every virtual site with a per-run study CA (its key is thrown away), so the signed path
        is the one exercised. Deployment: the study CA certificate the coordinator holds (identity-ca), if any."""
        config = self.config
        if not config.secagg:
            return None
        if self.simulated and config.secagg_identities:
            enrolment = enrol_virtual_sites(config.num_sites, config.study_id, self.folder.path / "identities")
            return IdentityVerifier(enrolment.ca_cert.read_bytes(), config.study_id)
        if config.identity_ca:
            return IdentityVerifier(Path(config.identity_ca).expanduser().read_bytes(), config.study_id)
        return None

    def run(self) -> None:
        if not self.simulated:
            # Flower ends a deployed ServerApp from a signal handler (its parent SuperExec went away, or a signal):
            # its exit handlers may take long (they retry reaching the SuperLink) and it then force-exits after
            # 5 s, so the SystemExit may never reach the except below. Record the stop first thing instead.
            add_exit_handler(self._exiting, run_before_force_exit=True)
        try:
            with STOP.watching():
                last_round, reason = self._rounds()
        except BaseException as err:
            self._close(self._failure(err))
            raise
        self.folder.finish(last_round, self.model.state_dict(), reason,
                           self.averaged.state_dict() if self.averaged else None)
        self.closed = True
        log(INFO, "CareFed run finished after %d round(s) (%s). Run folder: %s", last_round, reason, self.folder.path)

    def _exiting(self) -> None:
        self._close(self._failure(SystemExit("Flower is stopping this ServerApp")))

    def _close(self, reason: str) -> None:
        """Mark the run failed with `reason`, once: the first reason recorded is the one that stopped it."""
        if not self.closed:
            self.closed = True
            self.folder.fail(reason)

    def _failure(self, err: BaseException) -> str:
        """Why the run stopped, for status.json. Deployed, Flower stops the ServerApp (SIGINT, then SystemExit) when
        its parent SuperExec goes away, which it does when the SuperLink stops or crashes: say that, not "0"."""
        if isinstance(err, RunInterrupted):
            return str(err)
        if isinstance(err, SystemExit | KeyboardInterrupt) and not self.simulated and os.getppid() != self.parent_pid:
            return (f"the SuperLink stopped during the run: Flower ended this ServerApp when its SuperExec (pid "
                    f"{self.parent_pid}) went away ({type(err).__name__}: {err}); the rounds completed before are in "
                    "metrics.json and checkpoints/, and a new run can be started once the SuperLink is back")
        return f"{type(err).__name__}: {err}"

    def _rounds(self) -> tuple[int, str]:
        """Each site evaluates the model it receives before training on it, and returns the metrics with its
        (masked) update: the previous round's model is evaluated without an exchange of its own. Sites outside
        the cohort are asked separately when every site is evaluated, and the last model once at the end."""
        nodes = self._wait_for_nodes()
        self._record(0, RoundOutcome())
        cohort, last_round, reason = nodes, self.config.num_server_rounds, "all rounds done"
        for server_round in range(1, self.config.num_server_rounds + 1):
            eligible = [n for n in nodes if n not in self.exhausted]
            stop = self._stop_reason(eligible)
            if stop:
                log(WARNING, "Stopping before round %d: %s.", server_round, stop)
                last_round, reason = server_round - 1, stop
                break
            self._wait_for_rejoin(eligible)
            cohort = self._planned(server_round, eligible) or self._sample(eligible)
            started, sent_before = time.perf_counter(), self.exchanges
            outside = [n for n in nodes if n not in cohort] if self.config.evaluates_all_sites else []
            self._amend_sites(server_round - 1, self._evaluate_sites(outside, server_round - 1))
            outcome = self._train(server_round, cohort, nodes)
            self._amend_sites(server_round - 1, outcome.evaluated)
            if outcome.total.contributors:
                weights = {k: v.numpy() for k, v in self.model.state_dict().items()}
                new_weights = self.server_optimizer.step(weights, outcome.total.mean())
                self.model.load_state_dict({k: torch.from_numpy(v) for k, v in new_weights.items()})
            else:
                log(WARNING, "Round %d: no update was aggregated; the global model is unchanged.", server_round)
            self._average()
            # a site that dropped before it ever named itself (a key stage, in its first round) is asked to
            # evaluate the new model: its reply names it, so metrics say which site dropped where
            unnamed = self._evaluate_sites([n for n in cohort if n not in self.node_site], server_round)
            outcome.exchanges += self.exchanges - sent_before
            self._record(server_round, outcome, seconds=time.perf_counter() - started, cohort=cohort)
            self._amend_sites(server_round, unnamed)
            self.folder.checkpoint(server_round, self.model.state_dict(), self.server_optimizer.state,
                                   self.average.state if self.average else None)
        final = nodes if self.config.evaluates_all_sites else cohort
        self._amend_sites(last_round, self._evaluate_sites(final, last_round))
        return last_round, reason

    def _average(self) -> None:
        """Fold this round's global model into the moving average, if the run keeps one."""
        if self.average is None:
            return
        assert self.averaged is not None
        averaged = self.average.update({k: v.numpy() for k, v in self.model.state_dict().items()})
        self.averaged.load_state_dict({k: torch.from_numpy(v) for k, v in averaged.items()})

    def _stop_reason(self, eligible: list[int]) -> str:
        if not eligible:
            return "no site can train within its privacy budget"
        if self.config.secagg and len(eligible) < self.config.secagg_min_cohort:
            return (f"only {len(eligible)} site(s) can still train, fewer than secagg-min-cohort="
                    f"{self.config.secagg_min_cohort}")
        return ""

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while True:
            STOP.check()
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.config.num_sites:
                return nodes[: self.config.num_sites]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of num-sites={self.config.num_sites} sites connected within "
                    f"{NODE_WAIT_SECONDS:.0f} s. With `flwr run`, pass --federation-config "
                    f"\"num-supernodes={self.config.num_sites}\" (or set num-sites to the federation's size); "
                    "in a deployment, check that every site's SuperNode is running.")
            time.sleep(0.5)

    def _wait_for_rejoin(self, eligible: list[int]) -> None:
        """Give sites that are offline (restarting) up to REJOIN_SECONDS to come back before a round starts: a
        message to an offline node fails at once, and so would the restarted site's round. Those still offline
        are asked all the same and drop by name; they are not waited for again until they are seen online (a
        site gone for good costs one wait, not one a round). A site seen offline lost its in-memory keys: an
        advertisement it sent for this round with the last unmask reply is not used."""
        online = set(self.grid.get_node_ids())
        self.gone &= set(eligible) - online  # back online: waited for again next time
        missing = set(eligible) - online - self.gone
        if self.advertised is not None:
            self.advertised.forget(set(eligible) - online)
        if not missing:
            return
        log(INFO, "Waiting up to %.0f s for offline sites (nodes %s) to rejoin.", REJOIN_SECONDS, sorted(missing))
        deadline = time.monotonic() + REJOIN_SECONDS
        while missing := missing - set(self.grid.get_node_ids()):
            STOP.check()
            if time.monotonic() > deadline:
                log(WARNING, "Sites (nodes %s) are still offline after %.0f s; the round starts without them.",
                    sorted(missing), REJOIN_SECONDS)
                self.gone |= missing
                return
            time.sleep(0.5)
        log(INFO, "The offline sites are online again.")

    def _sample(self, eligible: list[int]) -> list[int]:
        size = self.config.sites_per_round or len(eligible)
        return sorted(self.rng.sample(eligible, min(size, len(eligible))))

    def _planned(self, server_round: int, eligible: list[int]) -> list[int] | None:
        """The cohort sampled for this round when the last round's unmask request went out (with its advertise
        request), if every site of it can still train; else None, and the round samples afresh."""
        plan = self.advertised
        if plan is None or plan.protocol.server_round != server_round or not set(plan.cohort) <= set(eligible):
            return None
        return plan.cohort

    def _plan_next(self, server_round: int, nodes: list[int], refused: list[int]) -> NextRound | None:
        """The next round's cohort and protocol, sampled at this round's unmask stage (the privacy reports of this
        round's masked inputs are in by then), so its advertise request can go out with the unmask request."""
        if server_round >= self.config.num_server_rounds:
            return None
        eligible = [n for n in nodes if n not in self.exhausted and n not in refused]
        if self._stop_reason(eligible):
            return None
        cohort = self._sample(eligible)
        config = secagg_for_cohort(self.config, len(cohort))
        return NextRound(cohort, protocol_config(config, server_round + 1, count_parameters(self.model)))

    def _content(self, server_round: int, request: SiteRequest | None = None) -> RecordDict:
        return request_content(request or self.request, server_round, ArrayRecord(self.model.state_dict()),
                               simulation=self.config if self.simulated else None)

    def _send(self, nodes: Iterable[int], message_type: str, server_round: int) -> dict[int, RecordDict | str]:
        """Send to `nodes`; each asked node's first reply: its content, or why it failed (an error reply, or a
        reply that does not follow the protocol's schema, common.replies). Others' replies are ignored."""
        content = self._content(server_round)
        asked = sorted(set(nodes))
        out = [Message(content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round))
               for node in asked]
        replies: dict[int, RecordDict | str] = {}
        self.exchanges += 1
        for node, reply in send_and_receive(self.grid, out, self.config.round_timeout):
            if node not in asked or node in replies:
                continue
            if reply.has_error():
                replies[node] = reply.error.reason[:300]
                continue
            try:
                check_reply(message_type, stage_of(content), content, reply.content, plain_allowed=True)
                replies[node] = reply.content
            except ReplyRefused as err:
                replies[node] = f"malformed reply: {err}"
        return replies

    def _train(self, server_round: int, cohort: list[int], nodes: list[int]) -> RoundOutcome:
        outcome = RoundOutcome()
        if self.config.secagg:
            config = secagg_for_cohort(self.config, len(cohort))
            secure = SecAggRound(self.grid, config, server_round,
                                 self._content(server_round, config.site_request(**self.site_shape)),
                                 count_parameters(self.model),
                                 lambda node, content: self._note_train_reply(server_round, node, content, outcome),
                                 self.identity_verifier, advertised=self.advertised,
                                 next_round=lambda refused: self._plan_next(server_round, nodes, refused))
            result = secure.run(cohort)
            self.advertised = result.advertised  # used next round where made for its protocol
            outcome.secagg_aborted, outcome.secagg_dropped = result.aborted, result.dropped
            outcome.exchanges = result.exchanges
            for node in result.refused:  # a site's policy refused a key stage: it will refuse this run again
                self.exhausted.add(node)
                outcome.refused.append(node)
            if not result.aborted:
                outcome.total = result.total
            return outcome
        for node, reply in self._send(cohort, MessageType.TRAIN, server_round).items():
            if isinstance(reply, str):
                log(WARNING, "Round %d: node %d failed: %s", server_round, node, reply)
                outcome.failed.append(node)
                continue
            if self._note_train_reply(server_round, node, reply, outcome) and messages.UPDATE in reply:
                self._add_plain(server_round, node, reply, outcome)
        return outcome

    def _add_plain(self, server_round: int, node: int, reply: RecordDict, outcome: RoundOutcome) -> None:
        """A plain update (comparison mode), bounded like a secure sum: weight in (0, max], norm within the bound."""
        metrics = reply[messages.TRAIN_METRICS]
        delta = flatten({k: v.numpy() for k, v in reply[messages.UPDATE].items()})
        weight, norm = int(metrics["num-examples"]), float(np.linalg.norm(delta))
        if not 0 < weight <= self.config.secagg_max_weight or norm > self.config.update_clip_norm * (1 + 1e-6):
            log(WARNING, "Round %d: node %d sent an impossible update (weight or norm); dropped", server_round, node)
            outcome.failed.append(node)
            return
        outcome.total.add(delta, weight, bool(metrics["update-clipped"]))

    def _note_train_reply(self, server_round: int, node: int, content: RecordDict, outcome: RoundOutcome) -> bool:
        """Record the site's privacy report and status; True if it trained."""
        status = content[messages.STATUS]
        report = content.get(messages.PRIVACY_REPORT)
        metrics = content.get(messages.TRAIN_METRICS)
        source = report if report is not None else metrics
        site: int | str = int(source["site"]) if source is not None else self.node_site.get(node, f"node-{node}")
        if isinstance(site, int):
            self.node_site[node] = site
        if report is not None:
            self.folder.record_privacy(site, {"round": server_round, "status": status["state"], **report})
            if not report["next-round-affordable"]:
                self.exhausted.add(node)  # stop sampling it before it has to refuse
        if status["state"] == messages.STATE_REFUSED:
            log(INFO, "Round %d: %s", server_round, status["reason"])
            self.exhausted.add(node)
            outcome.refused.append(node)
            return False
        outcome.trained.append(site)
        evaluation = content.get(messages.EVAL_METRICS)  # the received model, evaluated before training
        if evaluation is not None:
            outcome.evaluated[int(evaluation["site"])] = float(evaluation["accuracy"])
        return True

    def _sites(self, nodes: Iterable[int]) -> list[int | str]:
        """Site ids of these nodes; a node that never answered anything is named "node-<id>"."""
        known = sorted(self.node_site[n] for n in nodes if n in self.node_site)
        return [*known, *sorted(f"node-{n}" for n in nodes if n not in self.node_site)]

    def _evaluate_sites(self, nodes: list[int], server_round: int) -> dict[int, float]:
        """Each listed site's accuracy on its own held-out split (all sites, or the round's cohort at scale)."""
        accuracy: dict[int, float] = {}
        if not nodes:
            return accuracy
        for node, reply in self._send(nodes, MessageType.EVALUATE, server_round).items():
            if isinstance(reply, str):
                log(WARNING, "Evaluation: node %d failed: %s", node, reply)
                continue
            if messages.EVAL_METRICS not in reply:  # the site's policy refused to evaluate
                log(INFO, "Evaluation: node %d refused: %s", node, reply[messages.STATUS]["reason"])
                continue
            metrics = reply[messages.EVAL_METRICS]
            self.node_site[node] = int(metrics["site"])
            accuracy[int(metrics["site"])] = float(metrics["accuracy"])
        return dict(sorted(accuracy.items()))

    def _record(self, server_round: int, outcome: RoundOutcome, seconds: float = 0.0,
                cohort: Iterable[int] = ()) -> None:
        """The round's row; its sites' accuracies follow (`_amend_sites`) when they evaluate its model."""
        loss, acc = evaluate_model(self.scored, self.test_x, self.test_y)
        averaged = evaluate_model(self.averaged_scored, self.test_x, self.test_y)[1] if self.averaged_scored else None
        latest_epsilon = [reports[-1]["epsilon"] for reports in self.folder.privacy.values() if reports]
        row: dict[str, Any] = {
            "round": server_round,
            "global-loss": loss,
            "global-accuracy": acc,
            "averaged-accuracy": averaged,  # the moving average of the global models (server-averaging), if kept
            **_site_fields({}, "all" if self.config.evaluates_all_sites else "cohort"),
            "max-epsilon": max(latest_epsilon) if latest_epsilon else 0.0,
            "sites-sampled": self._sites(cohort),
            "sites-trained": sorted(outcome.trained),
            "sites-refused": self._sites(outcome.refused),
            "sites-failed": self._sites(outcome.failed),
            "updates-aggregated": outcome.total.contributors,
            "updates-clipped": outcome.total.clipped,
            "secure-aggregation": self.config.secagg,
            "secagg-aborted": outcome.secagg_aborted,
            "secagg-dropped": {stage: self._sites(nodes) for stage, nodes in outcome.secagg_dropped.items()},
            "exchanges": outcome.exchanges,
            "seconds": seconds,
        }
        self.folder.record_round(row)
        log(INFO, "round %3d | global acc %.4f | max eps %.3f | aggregated %d refused %d failed %d",
            server_round, acc, row["max-epsilon"], outcome.total.contributors, len(outcome.refused),
            len(outcome.failed))

    def _amend_sites(self, server_round: int, accuracy: dict[int, float]) -> None:
        """Add sites' accuracies of round `server_round`'s model to that round's row."""
        if not accuracy:
            return
        row = next(r for r in self.folder.rounds if r["round"] == server_round)
        known = {int(k): v for k, v in row["site-accuracy"].items()} | accuracy
        fields = _site_fields(known, row["sites-evaluated"])
        self.folder.amend_round(server_round, fields)
        log(INFO, "round %3d | evaluated at %d site(s) | worst-site acc %.4f", server_round, len(known),
            fields["worst-site-accuracy"])


def _site_fields(accuracy: dict[int, float], evaluated: str) -> dict[str, Any]:
    return {
        "site-accuracy": {str(k): v for k, v in sorted(accuracy.items())},
        "sites-evaluated": evaluated,
        "mean-site-accuracy": float(np.mean(list(accuracy.values()))) if accuracy else None,
        "worst-site-accuracy": min(accuracy.values()) if accuracy else None,
    }
