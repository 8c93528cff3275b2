"""The site's gate: every request is parsed and checked against the site's policy before anything is computed.

It runs as a Flower client mod, outside fault injection and secure aggregation, so no key is generated, no image
read, no noise calibrated and no gradient computed for a request the site would not accept. A refusal is a named
reply (status "refused" and the reason: which setting, what was asked, what the policy allows) and an entry in the
site's ledger; the egress guard logs the reply too. Nothing else leaves.

A deployed site's policy is its own file (node config `policy=...`); its state folder (`state-dir=...`) is
required, and a request carrying the simulation section (run folder, faults) is refused: paths come from the site.
Virtual sites of a simulation read `site-policy` from the run config (a file that may give each site its own
table), or, without one, accept the study as configured.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from client.identity import STATE_DIR_KEY, is_simulated, site_id
from common import messages
from common.config import RunConfig, resolve
from common.errors import CareFedError, ConfigError
from common.policy import MAX_STUDY_EPSILON, PolicyRefusal, SitePolicy, load_policy
from common.privacy.ledger import LedgerError, PrivacyLedger
from common.secagg.client import Enrolment
from common.secagg.errors import AbortReason, SecAggAbort
from common.secagg.identity import IdentityError, IdentityVerifier, SiteIdentity, certificate_study_id
from common.secagg.protocol import SPARSE_NEIGHBOURHOOD_DROPOUT
from common.study import RequestError, SecAggSection, SiteRequest, StudySection, check_name

# A round writes a ledger entry (kilobytes), egress-log lines and, deployed, compiled kernels into the state folder.
STATE_DIR_MIN_FREE_MIB, STATE_DIR_PROBE_BYTES = 16, 64 * 1024
POLICY_KEY = "policy"  # node_config: the site's policy file
IDENTITY_KEY = "identity"  # node_config: the site's folder from `carefed certs` (identity.key/.crt, ca.crt), or
# a folder holding one such folder per study id


class SiteSetupError(CareFedError):
    """The SuperNode itself is not set up to take part (no state folder, no policy): fix its node config."""


@dataclass(frozen=True)
class Admission:
    """A request the site accepts, with what it needs to act on it."""

    request: SiteRequest
    policy: SitePolicy
    config: RunConfig  # the site's settings with the request's sections applied: what it trains with
    site: int
    state_dir: Path
    server_round: int


def admit(message_type: str, content: RecordDict, context: Context) -> Admission:
    """Parse the request and check it against the protocol and the site's policy; raise a named error if not."""
    site = site_id(context)
    request = SiteRequest.parse(content)
    config = _site_config(content, context).with_request(request)
    policy = site_policy(context, config, site)
    policy.check_study(request.study, request.privacy, request.secagg)
    if message_type == MessageType.EVALUATE:
        if messages.SECAGG in content:
            raise RequestError("an evaluation request carries a secure-aggregation stage")
        policy.check_evaluation()
    elif message_type != MessageType.TRAIN:
        raise RequestError(f"message type '{message_type}' is not part of the protocol")
    elif messages.SECAGG not in content and (request.secagg.secagg or policy.secagg_required):
        raise PolicyRefusal("secagg", "a training request outside secure aggregation",
                            "training only inside a secure-aggregation round")
    _check_cohort(content, policy, request)
    folder = state_dir(context, config, site)
    if message_type == MessageType.TRAIN and _opens_a_round(content):
        check_state_dir(folder)
    return Admission(request, policy, config, site, folder, request_round(content))


def _opens_a_round(content: RecordDict) -> bool:
    """A plain training request, or a secure-aggregation round's first stage (before any key is made)."""
    record = content.get(messages.SECAGG)
    return record is None or (isinstance(record, ConfigRecord) and record.get("stage") == messages.STAGE_ADVERTISE)


def check_state_dir(folder: Path) -> None:
    """A round's ledger entry is committed before its update leaves, so a site whose state folder cannot take one
    (read-only, full, not a folder) refuses the round here, before any key, image or gradient. The reason leaves
    the site; the folder's path stays in its own log."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".carefed-write-probe.") as probe:
            probe.write(bytes(STATE_DIR_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
        free_mib = shutil.disk_usage(folder).free // 2**20
    except OSError as err:
        log(WARNING, "the state folder %s cannot be written: %s", folder, err)
        raise SiteSetupError(f"the site's state folder cannot be written ({err.strerror or type(err).__name__}); "
                             "its ledger must record a round before the round's update may leave") from None
    if free_mib < STATE_DIR_MIN_FREE_MIB:
        log(WARNING, "the state folder %s has %d MiB free", folder, free_mib)
        raise SiteSetupError(f"the site's state folder is full (under {STATE_DIR_MIN_FREE_MIB} MiB free); its "
                             "ledger must record a round before the round's update may leave")


def _tagged(values: dict) -> tuple:
    """The section's items, hashable, each value with its type (1, 1.0 and True are equal, but not alike)."""
    def tag(value: object) -> object:
        return (type(value).__name__, tuple(tag(v) for v in value) if isinstance(value, list) else value)

    return tuple(sorted((str(key), tag(value)) for key, value in values.items()))


@functools.lru_cache(maxsize=16)
def _simulation_config(tagged: tuple) -> RunConfig:
    """A simulation's run config, parsed once per worker process: every message of a run carries the same section
    (a frozen RunConfig; an invalid section raises every time, lru_cache keeps no exception)."""
    def untag(value: tuple) -> object:
        kind, inner = value
        return [untag(v) for v in inner] if kind == "list" else inner

    return RunConfig.from_mapping({key: untag(value) for key, value in tagged})


def _site_config(content: RecordDict, context: Context) -> RunConfig:
    if is_simulated(context):
        try:
            return _simulation_config(_tagged(dict(_record(content, messages.SIMULATION))))
        except ConfigError as err:
            raise RequestError(f"section 'simulation': {err}") from None
    if messages.SIMULATION in content:
        raise PolicyRefusal("simulation", "the run folder, faults and partitions of a simulation",
                            "none: a deployed site keeps its own paths and data")
    return _deployed_defaults()


@functools.lru_cache(maxsize=1)
def _deployed_defaults() -> RunConfig:
    """The app's own defaults for what no request carries (threads, devices); never the coordinator's."""
    return resolve()


def site_policy(context: Context, config: RunConfig, site: int) -> SitePolicy:
    if not is_simulated(context):
        if POLICY_KEY not in context.node_config:
            raise SiteSetupError(f"this SuperNode has no '{POLICY_KEY}' in its node config; write one with "
                                 "`carefed site policy init` and start the SuperNode with --node-config "
                                 f"'{POLICY_KEY}=\"/path/to/policy.toml\" ...'")
        return load_policy(Path(str(context.node_config[POLICY_KEY])))
    if config.site_policy:
        return load_policy(Path(config.site_policy), site)
    return accepting_policy(config)


def accepting_policy(config: RunConfig) -> SitePolicy:
    """A virtual site without a policy file accepts the study as configured (within the hard ceilings), so a
    simulation models consenting sites; a scenario's `site-policy` file models sites with their own limits."""
    epsilon = min(max([config.target_epsilon, *config.site_budgets]), MAX_STUDY_EPSILON)
    auto_rate = SPARSE_NEIGHBOURHOOD_DROPOUT if config.secagg_graph_degree == 0 else 0.0  # large cohorts' graph
    return SitePolicy(
        studies=(config.study_id,), dp_required=config.dp, min_privacy_unit=config.privacy_unit,
        max_epsilon_per_study=epsilon, lifetime_epsilon=epsilon, max_delta=min(config.target_delta, 1e-3),
        secagg_required=config.secagg, require_signatures=config.secagg_identities,
        min_cohort=config.secagg_min_cohort, min_neighbours=1,
        max_dropout_rate=min(max(config.secagg_dropout_rate, auto_rate), 0.49), max_cohort=max(config.num_sites, 3),
        models=(config.model,), max_augmentations=config.augmentations, send_evaluation_metrics=True)


def state_dir(context: Context, config: RunConfig, site: int) -> Path:
    """The site's own folder (ledger, egress log): `state-dir` when deployed (required), else the run folder's."""
    if STATE_DIR_KEY in context.node_config:
        return Path(str(context.node_config[STATE_DIR_KEY])).expanduser()
    if not is_simulated(context):
        raise SiteSetupError(f"this SuperNode has no '{STATE_DIR_KEY}' in its node config; a deployed site keeps "
                             f"its ledger in its own folder: --node-config '{STATE_DIR_KEY}=\"/srv/carefed\" ...'")
    return Path(config.output_dir).expanduser().resolve() / config.run_name / "sites" / f"site-{site:04d}"


def enrolment_for(context: Context, content: RecordDict, round_requires: bool) -> Enrolment | None:
    """The site's identity and the study CA it verifies peers against, read from the site's own files, never a
    message. Loaded where the site's policy requires enrolled peers (a deployed site's policy; a simulation's
    secagg-identities), and where the round asks for them and the site has an identity: a round stricter than the
    policy is fine, one laxer than it is refused (client.secagg_mod)."""
    request = SiteRequest.parse(content)  # the gate has checked it
    config = _site_config(content, context).with_request(request)
    site = site_id(context)
    required = site_policy(context, config, site).require_signatures
    if not (required or round_requires):
        return None
    try:
        return _load_enrolment(context, config, site, request)
    except SecAggAbort:
        if required:
            raise
        return None  # not enrolled, and its policy does not need it: the round decides whether it may take part


def _load_enrolment(context: Context, config: RunConfig, site: int, request: SiteRequest) -> Enrolment:
    if is_simulated(context):
        folder = state_dir(context, config, site).parent.parent / "identities" / f"site-{site}"
    elif IDENTITY_KEY in context.node_config:
        folder = Path(str(context.node_config[IDENTITY_KEY])).expanduser()
        if (folder / request.study.study_id).is_dir():  # a site in several studies: one identity per study
            folder = folder / request.study.study_id
    else:
        raise SecAggAbort(AbortReason.NO_IDENTITY, f"no '{IDENTITY_KEY}' folder in the node config")
    try:
        identity = SiteIdentity.load(folder)
        verifier = IdentityVerifier.for_site(folder, request.study.study_id)
    except (IdentityError, OSError) as err:
        raise SecAggAbort(AbortReason.NO_IDENTITY, type(err).__name__) from None
    if certificate_study_id(identity.certificate) != request.study.study_id:
        raise SecAggAbort(AbortReason.NO_IDENTITY, "this site's identity certificate is for another study")
    return Enrolment(identity, verifier, request.study.study_id, request.study.run_name)


def simulated_site_folder(context: Context, content: RecordDict) -> Path | None:
    """A virtual site's folder in the run folder (None when the request does not say which run)."""
    try:
        config = _site_config(content, context)
        study = content.get(StudySection.record_name)
        run_name = _safe_name(study, "run-name") if isinstance(study, ConfigRecord) else ""
        return state_dir(context, config.replace(run_name=run_name) if run_name else config, site_id(context))
    except (CareFedError, ValueError):
        return None


def request_round(content: RecordDict) -> int:
    record = content.get(messages.SECAGG) or content.get(messages.ROUND)
    value = record.get("round") if record is not None else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RequestError("the request has no valid round number")
    return value


def _check_cohort(content: RecordDict, policy: SitePolicy, request: SiteRequest) -> None:
    """A secure-aggregation stage must run the protocol the (checked) section describes; once it names the
    cohort, the cohort's size and this site's number of neighbours must be allowed."""
    record = content.get(messages.SECAGG)
    if record is None:
        return
    if not isinstance(record, ConfigRecord):
        raise RequestError("secure aggregation: the stage record is malformed")
    if "protocol-server_round" in record and record["protocol-server_round"] != record.get("round"):
        # the session and the advertisement's signature bind the protocol's round, not the request's
        raise RequestError("secure aggregation: 'protocol-server_round' differs from the request's round")
    proposed = request.secagg
    for key, expected in (("protocol-dropout_rate", proposed.dropout_rate), ("protocol-colluding",
                          proposed.colluding), ("protocol-min_cohort", proposed.min_cohort),
                          ("protocol-graph_degree", proposed.graph_degree), ("max-weight", proposed.max_weight)):
        if key in record and record[key] != expected:
            raise RequestError(f"secure aggregation: '{key}' differs from the request's "
                               f"'{SecAggSection.record_name}' section")
    if "ids" in record:
        cohort = len(record["ids"]) if isinstance(record["ids"], list) else -1
    elif "cohort-size" in record:
        cohort = record["cohort-size"] if isinstance(record["cohort-size"], int) else -1
    else:
        return
    if cohort < 0:
        raise RequestError("secure aggregation: the cohort is malformed")
    policy.check_cohort(cohort, request.secagg.graph_degree)


def _record(content: RecordDict, name: str) -> ConfigRecord:
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise RequestError(f"the request has no '{name}' section")
    return record


# -- the mod and refusals ------------------------------------------------------------------------------------
def policy_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: refuse, by name, what the site's policy or the protocol does not allow."""
    try:
        admit(msg.metadata.message_type, msg.content, context)
    except (PolicyRefusal, RequestError, SiteSetupError, ConfigError) as err:
        return Message(refuse(msg.content, context, err), reply_to=msg)
    return call_next(msg, context)


def refuse(content: RecordDict, context: Context, err: CareFedError, dataset: str = "") -> RecordDict:
    """The refusal reply, after the refusal is committed to the site's ledger (where the site has one)."""
    reason = f"{type(err).__name__}: {err}"[:400]
    _record_refusal(content, context, reason, dataset)
    return RecordDict({messages.STATUS: ConfigRecord({"state": messages.STATE_REFUSED, "reason": reason})})


def _record_refusal(content: RecordDict, context: Context, reason: str, dataset: str) -> None:
    study = content.get(StudySection.record_name)
    valid = isinstance(study, ConfigRecord)
    run_id, study_id = (_safe_name(study, "run-name"), _safe_name(study, "study-id")) if valid else ("", "")
    try:
        site = site_id(context)
        folder = state_dir(context, _deployed_defaults(), site) if not is_simulated(context) \
            else simulated_site_folder(context, content)
    except (CareFedError, ValueError):
        folder = None
    try:
        server_round = request_round(content)
    except RequestError:
        server_round = -1  # recorded all the same: a bad round number must not hide a refusal
    if folder is None:
        return  # no folder to record in (a misconfigured SuperNode, or a request without a run): the reply says it
    # the reply still refuses where the folder is unwritable (and such a site trains nothing either)
    with contextlib.suppress(LedgerError, OSError):
        PrivacyLedger(folder / "ledger.sqlite").refusal(run_id=run_id, study=study_id, round=server_round,
                                                        site=site, reason=reason, dataset=dataset)


def _safe_name(record: ConfigRecord, key: str) -> str:
    try:
        return check_name(key, record.get(key, ""))
    except RequestError:
        return ""
