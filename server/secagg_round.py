"""One round of secure aggregation over Flower's Grid: a thin adapter over common.secagg.ServerSession.

Four `train` messages per site (advertise keys, share keys, masked input, unmask). Sites that do not answer a
stage, answer with an error, or refuse a request are dropouts; the protocol recovers them or aborts the round.
The server ends up with sum_k n_k * delta_k, sum_k n_k and the number of clipped updates, and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages
from common.config import RunConfig
from common.secagg.client import Advertisement, UnmaskResponse
from common.secagg.encoding import FixedPoint
from common.secagg.errors import SecAggAbort
from common.secagg.protocol import ProtocolConfig, model_digest
from common.secagg.server import ServerSession
from common.wire import array_view, ids_from_wire, ids_to_wire, protocol_config_to_record
from server.aggregation import DeltaSum

ReplyHandler = Callable[[int, RecordDict], None]
REQUEST_SECTIONS = (messages.STUDY, messages.PRIVACY, messages.SECURE_AGGREGATION, messages.SIMULATION)


@dataclass
class SecAggOutcome:
    total: DeltaSum = field(default_factory=DeltaSum)
    aborted: str = ""
    dropped: dict[str, list[int]] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)  # nodes whose site refused a key stage (named in its reply)


def protocol_config(config: RunConfig, server_round: int, num_parameters: int) -> ProtocolConfig:
    return ProtocolConfig(
        server_round=server_round, vector_length=num_parameters + 2, dropout_rate=config.secagg_dropout_rate,
        colluding=config.secagg_colluding, min_cohort=config.secagg_min_cohort,
        graph_degree=config.secagg_graph_degree,
    )


class SecAggRound:
    def __init__(self, grid: Grid, config: RunConfig, server_round: int, train_content: RecordDict,
                 num_parameters: int, on_train_reply: ReplyHandler) -> None:
        self.grid = grid
        self.config = config
        self.round = server_round
        self.train_content = train_content
        self.num_parameters = num_parameters
        self.on_train_reply = on_train_reply  # records privacy reports / refusals of the masked-input stage
        model = train_content[messages.GLOBAL_MODEL]
        self.model_hash = model_digest([arr.data for arr in model.values()])
        self.protocol = protocol_config(config, server_round, num_parameters)
        self.session = ServerSession(self.protocol, self.model_hash)

    def run(self, cohort: list[int]) -> SecAggOutcome:
        outcome = self.outcome = SecAggOutcome()
        try:
            self._stages(cohort, outcome)
        except SecAggAbort as err:
            outcome.aborted = f"{err.reason.name}: {err}"
            log(WARNING, "Round %d: %s; the global model is unchanged.", self.round, err)
        outcome.dropped = self.session.dropped_along_the_way
        return outcome

    def _stages(self, cohort: list[int], outcome: SecAggOutcome) -> None:
        common = {"round": self.round, "model-hash": self.model_hash}
        # 1. advertise keys
        replies = self._exchange(cohort, lambda _: RecordDict({messages.SECAGG: ConfigRecord({
            "stage": messages.STAGE_ADVERTISE, **common, **protocol_config_to_record(self.protocol)})}))
        ads = {u: Advertisement(u, bytes(r["c-pk"]), bytes(r["s-pk"]), bytes(r["signature"]))
               for u, r in self._secagg_records(replies).items()}
        relay = self.session.receive_advertisements(ads)
        u1 = [ad.node_id for ad in relay]
        # 2. share keys
        key_record = ConfigRecord({
            "stage": messages.STAGE_SHARE_KEYS, **common, "ids": ids_to_wire(u1),
            "c-pks": [ad.c_pk for ad in relay], "s-pks": [ad.s_pk for ad in relay],
            "signatures": [ad.signature for ad in relay],
        })
        replies = self._exchange(u1, lambda _: RecordDict({messages.SECAGG: key_record}))
        shares = {u: dict(zip(ids_from_wire(r["receivers"]), (bytes(c) for c in r["ciphertexts"]), strict=True))
                  for u, r in self._secagg_records(replies).items() if bytes(r["session"]) == self.session.session}
        requests = self.session.receive_shares(shares)
        # 3. masked input: train, then mask
        codec = FixedPoint.for_cohort(self.config.secagg_max_weight * self.config.update_clip_norm, len(u1))

        def masked_content(node: int) -> RecordDict:
            request = requests[node]
            content = RecordDict(dict(self.train_content.items()))
            content[messages.SECAGG] = ConfigRecord({
                "stage": messages.STAGE_MASKED_INPUT, **common, "session": self.session.session,
                "senders": ids_to_wire(request.ciphertexts), "ciphertexts": list(request.ciphertexts.values()),
                "alive": ids_to_wire(request.alive), "update-bound": self.config.update_clip_norm,
                "max-weight": float(self.config.secagg_max_weight), "cohort-size": len(u1),
            })
            return content

        replies = self._exchange(list(requests), masked_content, training=True)
        for node, content in replies.items():
            self.on_train_reply(node, content)
        unmask_request = self.session.receive_masked_inputs(self._masked_vectors(replies))
        # 4. unmask
        unmask_record = ConfigRecord({
            "stage": messages.STAGE_UNMASK, **common, "session": self.session.session,
            "alive": ids_to_wire(unmask_request.alive), "dropped": ids_to_wire(unmask_request.dropped),
        })
        replies = self._exchange(unmask_request.alive, lambda _: RecordDict({messages.SECAGG: unmask_record}))
        responses = {
            u: UnmaskResponse(
                dict(zip(ids_from_wire(r["b-owners"]), (bytes(s) for s in r["b-shares"]), strict=True)),
                dict(zip(ids_from_wire(r["s-owners"]), (bytes(s) for s in r["s-shares"]), strict=True)))
            for u, r in self._secagg_records(replies).items()
        }
        total = self.session.receive_unmasking(responses)
        p = self.num_parameters
        outcome.total.weighted_delta = codec.decode_sum(total[:p])
        outcome.total.weight = int(total[p])
        outcome.total.clipped = int(total[p + 1])
        outcome.total.contributors = len(unmask_request.alive)
        log(INFO, "Round %d: secure aggregation of %d sites (%d dropped after advertising keys)", self.round,
            len(unmask_request.alive), len(u1) - len(unmask_request.alive))

    def _exchange(self, nodes: Iterable[int], content_for: Callable[[int], RecordDict], *,
                  training: bool = False) -> dict[int, RecordDict]:
        """Send one stage to `nodes` (with the request's sections); keep replies that are not errors or refusals.
        At the training stage refusals are kept: the caller records them with the site's privacy report."""
        out = []
        sections = [name for name in REQUEST_SECTIONS if name in self.train_content]
        for node in nodes:
            content = content_for(node)
            for name in sections:
                content[name] = self.train_content[name]
            out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                               group_id=str(self.round)))
        replies: dict[int, RecordDict] = {}
        for reply in self.grid.send_and_receive(out, timeout=self.config.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Round %d: node %d failed: %s", self.round, node, reply.error.reason)
                continue
            status = reply.content.get(messages.STATUS)
            refused = status is not None and status["state"] == messages.STATE_REFUSED
            if status is not None and status["state"] == messages.STATE_ABORTED or (refused and not training):
                log(WARNING, "Round %d: node %d refused: %s", self.round, node, status["reason"])
                if refused:
                    self.outcome.refused.append(node)
                continue
            replies[node] = reply.content
        return replies

    def _masked_vectors(self, replies: dict[int, RecordDict]) -> Iterator[tuple[int, np.ndarray]]:
        """Each reply's masked vector, viewed in place; malformed ones are skipped (the site counts as dropped)."""
        for node, content in replies.items():
            record = content.get(messages.MASKED_UPDATE)
            if record is None or "masked" not in record:
                continue
            try:
                yield node, array_view(record["masked"].data, np.uint32, self.protocol.vector_length)
            except ValueError as err:
                log(WARNING, "Round %d: node %d sent a malformed masked vector: %s", self.round, node, err)

    @staticmethod
    def _secagg_records(replies: dict[int, RecordDict]) -> dict[int, ConfigRecord]:
        return {u: r[messages.SECAGG] for u, r in replies.items() if messages.SECAGG in r}

