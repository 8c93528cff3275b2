"""One round of secure aggregation over Flower's Grid: a thin adapter over common.secagg.ServerSession.

Up to five `train` messages per site (advertise keys, share keys, masked input, consistency check with enrolled
identities, unmask). The next round's cohort is sampled when the unmask request goes out, and its advertise
request goes out in the same exchange: riding on the unmask request of the sites in both cohorts, on its own to
the sites new to the next round. From the second round on a site that answered it is not asked to advertise
again: four exchanges a round (three without identities), with sampled cohorts too, unless a site of the next
cohort did not answer (it dropped out of this round, failed, or the next cohort's size gets another graph) and is
asked in an exchange of the next round.
Sites that do not answer a stage, answer with an error, or refuse a request are dropouts; the protocol recovers
them or aborts the round. The server ends up with sum_k n_k * delta_k, sum_k n_k and the number of clipped
updates, and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages
from common.config import RunConfig
from common.replies import ReplyRefused, check_reply, split_next_round, status_of
from common.secagg.client import Advertisement, Enrolment, UnmaskResponse
from common.secagg.encoding import FixedPoint
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.identity import IdentityVerifier
from common.secagg.protocol import ProtocolConfig, model_digest
from common.secagg.server import MaskedInputRequest, ServerSession, UnmaskRequest
from common.secagg.stages import (
    AdvertiseRequest,
    ConsistencyRequest,
    MalformedMessage,
    ShareKeysRequest,
    Stage,
    parse_reply,
)
from common.secagg.stages import MaskedInputRequest as MaskedInput
from common.secagg.stages import UnmaskRequest as Unmask
from common.wire import array_view
from server.aggregation import DeltaSum, check_aggregate
from server.exchange import send_and_receive

ReplyHandler = Callable[[int, RecordDict], None]
REQUEST_SECTIONS = (messages.STUDY, messages.PRIVACY, messages.SECURE_AGGREGATION, messages.SIMULATION)


@dataclass
class Advertised:
    """What sites answered to the advertise request that rode on the previous round's unmask request: each one's
    advertisement, or the (state, reason) of its refusal or abort; valid only for the round `protocol` names."""

    protocol: ProtocolConfig
    cohort: list[int] = field(default_factory=list)  # the round's cohort, sampled when the request was sent
    ads: dict[int, Advertisement] = field(default_factory=dict)
    declined: dict[int, tuple[str, str]] = field(default_factory=dict)

    def forget(self, nodes: Iterable[int]) -> None:
        """Sites that lost their keys (seen offline: restarted) are asked again."""
        for node in nodes:
            self.ads.pop(node, None)
            self.declined.pop(node, None)


@dataclass
class SecAggOutcome:
    total: DeltaSum = field(default_factory=DeltaSum)
    aborted: str = ""
    dropped: dict[str, list[int]] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)  # nodes whose site refused a key stage (named in its reply)
    exchanges: int = 0  # message exchanges with the sites this round
    advertised: Advertised | None = None  # for the next round, from this round's unmask replies


def protocol_config(config: RunConfig, server_round: int, num_parameters: int) -> ProtocolConfig:
    return ProtocolConfig(
        server_round=server_round, vector_length=num_parameters + 2, dropout_rate=config.secagg_dropout_rate,
        colluding=config.secagg_colluding, min_cohort=config.secagg_min_cohort,
        graph_degree=config.secagg_graph_degree, require_signatures=config.secagg_identities,
    )


@dataclass(frozen=True)
class NextRound:
    """The next round's cohort, sampled before this round's unmask request, and its protocol."""

    cohort: list[int]
    protocol: ProtocolConfig


# this round's refusals so far -> the next round (None: there is none)
NextRoundPlan = Callable[[list[int]], NextRound | None]


class SecAggRound:
    def __init__(self, grid: Grid, config: RunConfig, server_round: int, train_content: RecordDict,
                 num_parameters: int, on_train_reply: ReplyHandler, verifier: IdentityVerifier | None = None,
                 workers: int | None = None, *, advertised: Advertised | None = None,
                 next_round: NextRoundPlan | None = None) -> None:
        """`advertised`: the previous round's advertisements, sent with its unmask exchange (used where they were
        made for this round's protocol); `next_round`: samples the next round's cohort when the unmask request is
        sent, so that its advertise request goes out in the same exchange (riding on the unmask request of the
        sites that are asked both, and on its own to the others)."""
        self.grid = grid
        self.config = config
        self.round = server_round
        self.train_content = train_content
        self.num_parameters = num_parameters
        self.on_train_reply = on_train_reply  # records privacy reports / refusals of the masked-input stage
        model = train_content[messages.GLOBAL_MODEL]
        self.model_hash = model_digest([arr.data for arr in model.values()])
        self.protocol = protocol_config(config, server_round, num_parameters)
        self.session = ServerSession(self.protocol, self.model_hash, workers)
        self.enrolment = Enrolment(None, verifier, config.study_id, config.run_name) if verifier else None
        self.cohort_size = 0  # sites that advertised valid keys (U1): the fixed-point scale's cohort
        self.advertised = advertised if advertised and advertised.protocol == self.protocol else None
        self.next_round = next_round
        self.cohort: list[int] = []
        self.outcome = SecAggOutcome()

    def run(self, cohort: list[int]) -> SecAggOutcome:
        outcome = self.outcome = SecAggOutcome()
        self.cohort = list(cohort)
        try:
            advertisements = self.advertise_keys(cohort)
            requests = self.share_keys(advertisements)
            unmask_request = self.masked_input(requests)
            signatures = self.consistency_check(unmask_request)
            outcome.total = self.unmask(unmask_request, signatures)
        except SecAggAbort as err:
            outcome.aborted = f"{err.reason.name}: {err}"
            outcome.total = DeltaSum()
            log(WARNING, "Round %d: %s; the global model is unchanged.", self.round, err)
        outcome.dropped = self.session.dropped_along_the_way
        return outcome

    # -- one method per stage, mirroring ServerSession ------------------------------------------------------
    def advertise_keys(self, cohort: list[int]) -> list[Advertisement]:
        """Sites that advertised (or declined) with the previous round's unmask reply are not asked again."""
        prior = self.advertised or Advertised(self.protocol)
        ads = {u: prior.ads[u] for u in cohort if u in prior.ads}
        for node in (u for u in cohort if u in prior.declined):
            state, reason = prior.declined[node]
            self._declined(Stage.ADVERTISE, node, state, reason)
        ask = [u for u in cohort if u not in ads and u not in prior.declined]
        if ask:
            request = AdvertiseRequest(self.round, self.protocol)
            replies = self._key_stage(Stage.ADVERTISE, ask, request.record(), len(cohort))
            ads |= {u: Advertisement(u, r.c_pk, r.s_pk, r.signature, r.certificate) for u, r in replies.items()}
        return self.session.receive_advertisements(self._enrolled(dict(sorted(ads.items()))))

    def _enrolled(self, ads: dict[int, Advertisement]) -> dict[int, Advertisement]:
        """With the study CA, drop advertisements the sites would refuse (unknown, forged or duplicate identities)
        before relaying them, so one bad advertisement costs its sender the round, not everyone's. The sites
        check every advertisement again themselves: this is for liveness, not for their security."""
        if self.enrolment is None or self.enrolment.verifier is None:
            return ads
        verifier, valid, peers = self.enrolment.verifier, {}, {}
        for node, ad in ads.items():
            try:
                peers[node] = verifier.verify_advertisement(
                    ad.certificate, ad.signature, self.enrolment.payload(self.protocol, node, ad.c_pk, ad.s_pk))
                valid[node] = ad
            except SecAggAbort:
                self._note(Stage.ADVERTISE, "bad-identity", [node])
        names = Counter(peer.fingerprint for peer in peers.values())
        duplicates = [u for u, peer in peers.items() if names[peer.fingerprint] > 1]
        self._note(Stage.ADVERTISE, "duplicate-identity", duplicates)
        return {u: ad for u, ad in valid.items() if u not in duplicates}

    def share_keys(self, relay: list[Advertisement]) -> dict[int, MaskedInputRequest]:
        u1 = [ad.node_id for ad in relay]
        request = ShareKeysRequest(self.round, self.model_hash, {ad.node_id: ad.c_pk for ad in relay},
                                   {ad.node_id: ad.s_pk for ad in relay}, {ad.node_id: ad.signature for ad in relay},
                                   {ad.node_id: ad.certificate for ad in relay})
        replies = self._key_stage(Stage.SHARE_KEYS, u1, request.record(), len(u1))
        shares = {u: r.ciphertexts for u, r in replies.items() if r.session == self.session.session}
        self.cohort_size = len(u1)
        return self.session.receive_shares(shares)

    def masked_input(self, requests: dict[int, MaskedInputRequest]) -> UnmaskRequest:
        def content(node: int) -> RecordDict:
            routed = requests[node]
            message = RecordDict(dict(self.train_content.items()))
            message[messages.SECAGG] = ConfigRecord(MaskedInput(
                self.round, self.model_hash, self.session.session, routed.ciphertexts, routed.alive,
                self.config.update_clip_norm, float(self.config.secagg_max_weight), self.cohort_size).record())
            return message

        replies, _ = self._exchange(Stage.MASKED_INPUT, list(requests), content, training=True)
        for node, reply in replies.items():
            self.on_train_reply(node, reply)
        return self.session.receive_masked_inputs(self._masked_vectors(replies))

    def consistency_check(self, request: UnmaskRequest) -> dict[int, bytes]:
        """Enrolled sites sign the survivor set; each will reveal shares only against t signatures of that same
        set (Bonawitz et al. 2017, section 4), so no site can be shown a different one. Skipped without identities."""
        if not self.protocol.require_signatures:
            return {}
        record = ConsistencyRequest(self.round, self.model_hash, self.session.session, request.alive).record()
        replies = self._key_stage(Stage.CONSISTENCY, request.alive, record, self.cohort_size)
        return {u: reply.signature for u, reply in sorted(replies.items())}

    def unmask(self, request: UnmaskRequest, signatures: dict[int, bytes]) -> DeltaSum:
        record = Unmask(self.round, self.model_hash, self.session.session, request.alive, request.dropped,
                        signatures).record()
        asked = list(signatures) if self.protocol.require_signatures else request.alive  # those that signed
        upcoming, riding, ahead = None, set(), []
        plan = self.next_round(list(self.outcome.refused)) if self.next_round is not None else None
        if plan is not None:
            self.outcome.advertised = Advertised(plan.protocol, plan.cohort)
        # The next round's advertise request goes out in this exchange, carrying this round's request sections;
        # only where they describe its protocol (a cohort of another size may get another graph: every site
        # would refuse the request, by name); otherwise the next round advertises in an exchange of its own.
        if plan is not None and dataclasses.replace(plan.protocol, server_round=self.round) == self.protocol:
            upcoming = AdvertiseRequest(self.round + 1, plan.protocol).record()
            riding = set(plan.cohort) & set(asked)
            # not this round's cohort: a site that dropped in this round is asked in the next, as before
            ahead = [u for u in plan.cohort if u not in self.cohort]
        replies = self._key_stage(Stage.UNMASK, asked, record, self.cohort_size, upcoming, riding, ahead)
        total = self.session.receive_unmasking(
            {u: UnmaskResponse(r.b_shares, r.s_shares) for u, r in replies.items()})
        result = self._decode(total, len(request.alive))
        log(INFO, "Round %d: secure aggregation of %d sites (%d dropped after advertising keys)", self.round,
            len(request.alive), self.cohort_size - len(request.alive))
        return result

    def _decode(self, total: np.ndarray, contributors: int) -> DeltaSum:
        """The unmasked sum, checked: weight, clip count and norm must be possible for these contributors."""
        p = self.num_parameters
        codec = FixedPoint.for_cohort(self.config.secagg_max_weight * self.config.update_clip_norm,
                                      self.cohort_size)
        result = DeltaSum(weighted_delta=codec.decode_sum(total[:p]), weight=int(total[p]),
                          clipped=int(total[p + 1]), contributors=contributors)
        rounding = math.sqrt(p) * contributors * codec.resolution
        check_aggregate(result, self.config.secagg_max_weight, self.config.update_clip_norm, rounding)
        return result

    def _key_stage(self, stage: Stage, nodes: list[int], request: dict[str, Any], max_items: int,
                   upcoming: dict[str, Any] | None = None, riding: set[int] = frozenset(),
                   ahead: list[int] = ()) -> dict[int, Any]:
        """Send a key stage (the same request to every site: its record is built once and shared, read-only); the
        next round's advertise request (`upcoming`) rides on the requests to `riding`, and goes on its own to
        `ahead`, in the same exchange. Parse each reply by its schema. A reply that does not parse is that site
        dropping at this stage (named in the log and in metrics), never an exception out of the round."""
        shared = {messages.SECAGG: ConfigRecord(request)}
        bundle = shared if upcoming is None else {**shared, messages.SECAGG_NEXT: ConfigRecord(upcoming)}
        own = {messages.SECAGG: ConfigRecord(upcoming)} if upcoming is not None else {}
        replies, next_round = self._exchange(
            stage, nodes, lambda node: RecordDict(bundle if node in riding else shared),
            ahead=(ahead, lambda node: RecordDict(own)))
        parsed, malformed = {}, []
        for node, content in replies.items():
            try:
                answer = None
                if node in riding:
                    content, answer = self._split_next_round(bundle, content)
                record = content.get(messages.SECAGG)
                if set(content.keys()) != {messages.SECAGG} or not isinstance(record, ConfigRecord):
                    raise MalformedMessage(AbortReason.BAD_RESPONSE, f"{stage} reply: wrong records")
                parsed[node] = parse_reply(stage, record, max_items)
                if node in riding:
                    self._keep_next_round(node, answer)  # only from a reply that parsed whole
            except MalformedMessage as err:
                log(WARNING, "Round %d: node %d sent a malformed reply: %s", self.round, node, err)
                malformed.append(node)
        self._note(stage, "malformed", malformed)
        for node, content in next_round.items():
            self._keep_next_round(node, self._advertisement_ahead(node, content))
        return parsed

    def _advertisement_ahead(self, node: int, content: RecordDict) -> Any:
        """A reply to the next round's advertise request sent on its own: the advertisement, or the (state, reason)
        of a refusal or abort; None (asked again next round) for anything else. Never this round's dropout."""
        try:
            status = status_of(content)
            if status is not None and status[0] != messages.STATE_TRAINED and set(content.keys()) == {messages.STATUS}:
                return status
            record = content.get(messages.SECAGG)
            if status is not None or set(content.keys()) != {messages.SECAGG} or not isinstance(record, ConfigRecord):
                raise MalformedMessage(AbortReason.BAD_RESPONSE, "advertise reply: wrong records")
            return parse_reply(Stage.ADVERTISE, record, 0)
        except (ReplyRefused, MalformedMessage) as err:
            log(WARNING, "Round %d: node %d sent a malformed reply to round %d's advertise request: %s", self.round,
                node, self.round + 1, err)
            return None

    @staticmethod
    def _split_next_round(request: dict[str, Any], content: RecordDict) -> tuple[RecordDict, Any]:
        """A reply's answer to the next round's advertise request, and the rest of the reply."""
        try:
            return split_next_round(RecordDict(request), content)
        except ReplyRefused as err:
            raise MalformedMessage(AbortReason.BAD_RESPONSE, str(err)) from None

    def _keep_next_round(self, node: int, answer: Any) -> None:
        advertised = self.outcome.advertised
        assert advertised is not None
        if isinstance(answer, tuple):
            advertised.declined[node] = answer
        elif answer is not None:
            advertised.ads[node] = Advertisement(node, answer.c_pk, answer.s_pk, answer.signature, answer.certificate)

    def _declined(self, stage: Stage, node: int, state: str, reason: str) -> None:
        """A site's named refusal or abort of a key stage: it drops here; a refusal is also the run's to note."""
        log(WARNING, "Round %d: node %d refused: %s", self.round, node, reason)
        if state == messages.STATE_REFUSED:
            self.outcome.refused.append(node)
        self._note(stage, state, [node])

    def _note(self, stage: Stage, why: str, nodes: Iterable[int]) -> None:
        """Every dropout at every stage, by cause, for metrics.json ("share-keys-no-reply": [...])."""
        if nodes:
            self.session.dropped_along_the_way.setdefault(f"{stage}-{why}", []).extend(sorted(nodes))

    def _exchange(self, stage: Stage, nodes: Iterable[int], content_for: Callable[[int], RecordDict], *,
                  training: bool = False, ahead: tuple[Iterable[int], Callable[[int], RecordDict]] = ((), dict),
                  ) -> tuple[dict[int, RecordDict], dict[int, RecordDict]]:
        """Send one stage to `nodes` (with the request's sections); keep the replies that are not errors, refusals
        or malformed (each of those is that site dropping here). At the training stage a refusal is kept: the
        caller records it with the site's privacy report. Replies from nodes not asked, or twice, are ignored.
        `ahead`: other sites, and their requests for the next round, sent in the same exchange; their replies
        (those that are not errors) come back separately, and are never this stage's dropouts."""
        requests = self._requests(nodes, content_for)
        others = self._requests((u for u in ahead[0] if u not in requests), ahead[1])
        out = [Message(content=c, dst_node_id=u, message_type=MessageType.TRAIN, group_id=str(self.round))
               for u, c in requests.items()]
        out += [Message(content=c, dst_node_id=u, message_type=MessageType.TRAIN, group_id=str(self.round + 1))
                for u, c in others.items()]
        self.outcome.exchanges += 1
        replies: dict[int, RecordDict] = {}
        next_round: dict[int, RecordDict] = {}
        answered: set[int] = set()
        for node, reply in send_and_receive(self.grid, out, self.config.round_timeout):
            if node in others and node not in next_round:
                if reply.has_error():  # asked again in the next round
                    log(WARNING, "Round %d: node %d failed round %d's advertise request: %s", self.round, node,
                        self.round + 1, reply.error.reason[:300])
                else:
                    next_round[node] = reply.content
            if node not in requests or node in answered:
                continue
            answered.add(node)
            if reply.has_error():
                log(WARNING, "Round %d: node %d failed: %s", self.round, node, reply.error.reason[:300])
                self._note(stage, "failed", [node])
                continue
            try:
                if training:
                    check_reply(MessageType.TRAIN, Stage.MASKED_INPUT, requests[node], reply.content,
                                plain_allowed=False)
                status = status_of(reply.content)
            except ReplyRefused as err:
                log(WARNING, "Round %d: node %d sent a malformed reply: %s", self.round, node, err)
                self._note(stage, "malformed", [node])
                continue
            if status is not None and (status[0] == messages.STATE_ABORTED
                                       or (status[0] == messages.STATE_REFUSED and not training)):
                self._declined(stage, node, *status)
                continue
            replies[node] = reply.content
        self._note(stage, "no-reply", set(requests) - answered)
        return replies, next_round

    def _requests(self, nodes: Iterable[int], content_for: Callable[[int], RecordDict]) -> dict[int, RecordDict]:
        """Each node's request, with the sections of the round's request it needs (study, privacy, ...)."""
        sections = [name for name in REQUEST_SECTIONS if name in self.train_content]
        requests: dict[int, RecordDict] = {}
        for node in nodes:
            requests[node] = content = content_for(node)
            for name in sections:
                content[name] = self.train_content[name]
        return requests

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
