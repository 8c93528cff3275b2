"""One site's round, between Flower messages and the trainer: admission, budgets, privacy state, replies.

Every request first passes the site's gate (client.policy_gate): parsed, checked against the site's policy.
The run's privacy state (budget, calibrated noise, accountant history) is kept in the node's Context.state and in
the site's ledger, which also holds every earlier run, so the study's and the dataset's lifetime epsilon are
composed from disk before each round: a restart or a new run id resets nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import socket
import sqlite3
from collections.abc import Mapping
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from client import after_reply
from client.identity import (
    CLASS_NAMES_KEY,
    DATA_KEY,
    DEPLOYMENT_SITE_KEY,
    LABELS_CSV_KEY,
    SKIP_UNREADABLE_KEY,
    WITHOUT_PATIENT_KEY,
    is_simulated,
)
from client.policy_gate import Admission, SiteSetupError, admit, refuse, state_dir
from client.trainer import patients_per_batch, train_locally, train_patient_level
from common import messages
from common.config import RunConfig
from common.data import SiteData, load_site_data
from common.data.site import LocalDataSpec, load_deployed_site_data
from common.errors import ConfigError, DataError
from common.evaluation import evaluate_model
from common.models import build_model, keep_features_on_disk, trained_part
from common.policy import PolicyRefusal
from common.privacy import SitePrivacy, memo
from common.privacy.budget import DatasetSpend, epsilon, independent_epsilon, planned_history
from common.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger, history_tuple
from common.study import RequestError, StudySection
from common.update_codec import clip_l2, flatten, unflatten

PRIVACY_STATE = "carefed.site-privacy"
GATE_ERRORS = (PolicyRefusal, RequestError, SiteSetupError, ConfigError)


def noise_generator(context: Context, config: RunConfig, site: int, server_round: int) -> torch.Generator:
    """Seeded randomness for a simulation's Poisson sampling and DP noise, so experiments reproduce. A deployed
    site draws both from a CSPRNG instead (common.privacy.secure_noise); the server never chooses its noise."""
    digest = hashlib.sha256(f"{config.seed}/{site}/{server_round}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def site_data(context: Context, admission: Admission) -> SiteData:
    """The site's images: its own files when deployed (node config `data`), else the simulated partition."""
    config, site, study = admission.config, admission.site, admission.request.study
    if is_simulated(context) and DATA_KEY not in context.node_config:
        data = load_site_data(config, site)
    elif DATA_KEY not in context.node_config:
        raise DataError(f"this SuperNode has no '{DATA_KEY}' in its node config; start it with --node-config "
                        f"'{DEPLOYMENT_SITE_KEY}=<n> {DATA_KEY}=\"/path/to/images\"' (see `carefed site check`)")
    else:
        node = context.node_config
        spec = LocalDataSpec(path=str(node[DATA_KEY]), labels_csv=str(node.get(LABELS_CSV_KEY, "")),
                             class_names=str(node.get(CLASS_NAMES_KEY, "")),
                             skip_unreadable=_flag(node, SKIP_UNREADABLE_KEY),
                             images_without_patient_id=_flag(node, WITHOUT_PATIENT_KEY))
        data = load_deployed_site_data(config, site, spec, image_size=study.image_size, channels=study.channels,
                                       num_classes=study.num_classes)[0]
    if tuple(data.train_x.shape[1:]) != (study.channels, study.image_size, study.image_size):
        raise DataError(f"the study trains on {study.channels}x{study.image_size}x{study.image_size} images; this "
                        f"site's are {tuple(data.train_x.shape[1:])}")
    return data


def _flag(node_config: Mapping[str, object], key: str) -> bool:
    return str(node_config.get(key, "false")).lower() == "true"


def model_for(study: StudySection) -> torch.nn.Module:
    """The study's model, built from the study section alone (architecture, image format, classes)."""
    return build_model(study.model, in_channels=study.channels, num_classes=study.num_classes,
                       image_size=study.image_size)


def site_device(config: RunConfig) -> torch.device:
    """A GPU when the run gives sites a GPU share (client-num-gpus > 0) and this node has one; else the CPU."""
    return torch.device("cuda") if config.client_num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def site_ledger(admission: Admission) -> PrivacyLedger:
    return PrivacyLedger(admission.state_dir / "ledger.sqlite")


def load_privacy(context: Context, ledger: PrivacyLedger, run_key: str, site: int, run: str) -> SitePrivacy | None:
    """This run's privacy state. The ledger is the source of truth (its last entry for this run and site holds
    the whole history, whatever Flower context or process asks); Context.state only caches a calibration that
    has not trained yet, and only for the run it was made for."""
    last = ledger.last(run, site)
    if last is not None:
        return SitePrivacy(last.budget, last.delta, last.noise_multiplier, last.sample_rate, last.steps_round,
                           last.clip_norm, last.planned_rounds, list(last.history))
    record = context.state.get(PRIVACY_STATE)
    if record is not None and record.get("run") == run_key and not record.get("history-steps"):
        return SitePrivacy.from_record(dict(record))
    return None


def ledger_entry(admission: Admission, privacy: SitePrivacy, dataset: str, lifetime_epsilon: float,
                 max_images_per_patient: int) -> LedgerEntry:
    config = admission.config
    return LedgerEntry(
        run_id=config.run_name, round=admission.server_round, site=admission.site, unit=config.privacy_unit,
        sample_rate=privacy.sample_rate, noise_multiplier=privacy.noise_multiplier,
        clip_norm=privacy.max_grad_norm, steps_round=privacy.steps_per_round, steps_total=privacy.steps_total,
        planned_rounds=privacy.planned_rounds, delta=privacy.delta, epsilon=privacy.epsilon(),
        epsilon_independent=privacy.independent_epsilon(), budget=privacy.target_epsilon,
        max_images_per_patient=max_images_per_patient, history=history_tuple(privacy.history),
        study=config.study_id, dataset=dataset, lifetime_epsilon=lifetime_epsilon,
        lifetime_budget=admission.policy.lifetime_epsilon, lifetime_delta=admission.policy.max_delta,
    )


def check_budgets(admission: Admission, ledger: PrivacyLedger, privacy: SitePrivacy) -> None:
    """The study's and the dataset's lifetime budgets, composed with every earlier run in the ledger.

    Before the site's first round of a run, the whole planned run must fit (a study that would push the dataset
    past its lifetime budget is refused before anything is trained); after that, each next round must."""
    policy, config = admission.policy, admission.config
    spend = DatasetSpend.from_entries(ledger.spends())
    planned = planned_history(privacy, privacy.planned_rounds if not privacy.history else 1)
    what = "this run as planned" if not privacy.history else "the next round"
    study_epsilon = epsilon(spend.history(exclude_run=config.run_name, study=config.study_id) + planned,
                            privacy.delta)
    if study_epsilon > policy.max_epsilon_per_study:
        raise PolicyRefusal("max-epsilon-per-study", f"epsilon {study_epsilon:.3f} for study {config.study_id} "
                            f"after {what}", f"{policy.max_epsilon_per_study:g} per study")
    lifetime = epsilon(spend.history(exclude_run=config.run_name) + planned, policy.max_delta)
    if lifetime > policy.lifetime_epsilon:
        raise PolicyRefusal("lifetime-epsilon", f"epsilon {lifetime:.3f} over every study after {what}",
                            f"{policy.lifetime_epsilon:g} for this dataset's lifetime")


def lifetime_spent(admission: Admission, ledger: PrivacyLedger, privacy: SitePrivacy) -> float:
    """The dataset's lifetime epsilon with this run's history as it now stands (before the entry is written)."""
    others = DatasetSpend.from_entries(ledger.spends()).history(exclude_run=admission.config.run_name)
    return epsilon(others + tuple(privacy.history), admission.policy.max_delta)


MAX_PLANNED_STEPS = 50_000  # DP-SGD steps one run may plan at one site: calibration stays bounded in time


def global_model_for(admission: Admission, content: RecordDict) -> torch.nn.Module:
    """The study's model with the coordinator's weights; a model that is not the study's is refused by name."""
    arrays = content.get(messages.GLOBAL_MODEL)
    model = model_for(admission.request.study)
    if not isinstance(arrays, ArrayRecord):
        raise RequestError("the training request carries no global model")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(int(d) for d in a.shape) for k, a in arrays.items()} != expected:
        raise RequestError("the global model's parameters do not fit the study section's model")
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except (RuntimeError, ValueError, TypeError) as err:
        raise RequestError(f"the global model cannot be loaded ({type(err).__name__})") from None
    return model


def check_run(admission: Admission, ledger: PrivacyLedger) -> None:
    """Against the site's ledger, before any data is read: a round is trained once and in order, a run name
    belongs to one study, and a run keeps its privacy unit."""
    config, server_round = admission.config, admission.server_round
    spends = ledger.spends()
    if any(e.run_id == config.run_name and e.study != config.study_id for e in spends):
        raise PolicyRefusal("run-name", config.run_name, "a run name that no other study has used at this site")
    last = ledger.last(config.run_name, admission.site)
    if last is not None and server_round <= last.round:
        raise PolicyRefusal("round", server_round, f"a round after {last.round}, the last this run trained here")
    if last is not None and last.unit != config.privacy_unit:
        raise PolicyRefusal("privacy-unit", config.privacy_unit, f"'{last.unit}' for the whole run")


def run_privacy(context: Context, ledger: PrivacyLedger, admission: Admission, data: SiteData,
                run_key: str) -> SitePrivacy:
    """This run's privacy state (from the ledger, or calibrated now), and the recipe it was calibrated for: a
    changed batch size, number of local epochs or data size within a run is refused by name."""
    config, site = admission.config, admission.site
    units, per_batch = sampling_units(config, data)
    batches = math.ceil(units / per_batch)
    if batches * config.local_epochs * config.planned_rounds > MAX_PLANNED_STEPS:
        raise PolicyRefusal("planned-steps", batches * config.local_epochs * config.planned_rounds,
                            f"at most {MAX_PLANNED_STEPS} DP-SGD steps planned per run")
    privacy = load_privacy(context, ledger, run_key, site, config.run_name)
    if privacy is None:
        privacy = calibrate_site(config, data, site)
        save_privacy(context, privacy, run_key)
    elif (privacy.sample_rate, privacy.steps_per_round) != (1.0 / batches, batches * config.local_epochs):
        raise PolicyRefusal("batch-size", f"batch-size {config.batch_size}, local-epochs {config.local_epochs} on "
                            "this data", "the recipe this run was calibrated for")
    return privacy


def sampling_units(config: RunConfig, data: SiteData) -> tuple[int, int]:
    """What the site samples and how many per expected batch: images, or patients at patient level."""
    if config.privacy_unit == "patient":
        return len(np.unique(data.train_patients)), patients_per_batch(config, data)
    return data.num_train, config.batch_size


def calibrate_site(config: RunConfig, data: SiteData, site: int) -> SitePrivacy:
    """The site's noise for the planned run, from what it samples (images, or patients at patient level)."""
    units, per_batch = sampling_units(config, data)
    return SitePrivacy.calibrate(
        target_epsilon=config.budget_for(site), delta=config.target_delta, num_examples=units,
        batch_size=per_batch, local_epochs=config.local_epochs, planned_rounds=config.planned_rounds,
        max_grad_norm=config.max_grad_norm)


def save_privacy(context: Context, privacy: SitePrivacy, run_key: str) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord({**privacy.to_record(), "run": run_key})


def privacy_report(site: int, privacy: SitePrivacy, max_images_per_patient: int,
                   entry: LedgerEntry | None = None) -> MetricRecord:
    """What a site discloses about its privacy spend each round (all public parameters, no data)."""
    return MetricRecord({
        "site": site,
        "epsilon": entry.epsilon if entry else privacy.epsilon(),
        "epsilon-independent": entry.epsilon_independent if entry else privacy.independent_epsilon(),
        "delta": privacy.delta,
        "budget-epsilon": privacy.target_epsilon,
        "sample-rate": privacy.sample_rate,
        "noise-multiplier": privacy.noise_multiplier,
        "max-grad-norm": privacy.max_grad_norm,
        "steps-round": privacy.steps_per_round,
        "steps-total": privacy.steps_total,
        "next-round-affordable": int(privacy.can_afford_next_round()),
        "planned-rounds": privacy.planned_rounds,
        "max-images-per-patient": max_images_per_patient,
        "history-noise": [float(s) for s, _, _ in privacy.history] or [0.0],
        "history-rate": [float(q) for _, q, _ in privacy.history] or [0.0],
        "history-steps": [int(n) for _, _, n in privacy.history] or [0],
    })


def record_placement(context: Context, config: RunConfig, site: int, server_round: int) -> None:
    """Simulation diagnostics: which Ray node (machine) ran this site each round, in sites/site-NNNN/placement.jsonl.

    On a multi-machine Ray cluster the run folder must be on storage every node mounts (site state lives there)."""
    if not is_simulated(context):
        return
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
        node = "local"
    path = state_dir(context, config, site) / "placement.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"round": server_round, "ray_node": node, "pid": os.getpid(), "host": socket.gethostname()})
    with path.open("a") as out:
        out.write(line + "\n")


def train_site(content: RecordDict, context: Context) -> RecordDict:
    """Run one round at this site: admit the request, check the run against the ledger, check every budget, train
    with DP-SGD, reply. Each refusal is named and recorded before anything more is touched."""
    try:
        admission = admit(MessageType.TRAIN, content, context)
        model = global_model_for(admission, content)  # before any data: the model must be the study's
        ledger = site_ledger(admission)
        check_run(admission, ledger)
    except GATE_ERRORS as err:
        return refuse(content, context, err)
    config, site = admission.config, admission.site
    torch.set_num_threads(config.client_threads)
    record_placement(context, config, site, admission.server_round)
    deployed = keep_derived_on_disk(context, admission)
    data = site_data(context, admission)
    max_per_patient = int(np.bincount(data.train_patients).max()) if data.num_train else 0
    privacy = None
    if config.dp:
        run_key = f"{config.study_id}/{config.run_name}"
        try:
            privacy = run_privacy(context, ledger, admission, data, run_key)
            if not privacy.can_afford_next_round():
                raise PolicyRefusal("num-server-rounds", f"a round spending epsilon "
                                    f"{privacy.epsilon_after_next_round():.3f} (spent {privacy.epsilon():.3f})",
                                    f"this run's budget {privacy.target_epsilon:g}")
            check_budgets(admission, ledger, privacy)
        except PolicyRefusal as err:
            refusal = refuse(content, context, err, data.fingerprint)
            if privacy is not None:
                refusal[messages.PRIVACY_REPORT] = privacy_report(site, privacy, max_per_patient)
            return refusal

    model.to(site_device(config))
    evaluation = _evaluation(admission, model, data)  # the received model, before training changes it
    generator = noise_generator(context, config, site, admission.server_round)
    # a deployed site draws its noise from a CSPRNG, and its SuperNode runs each message in a new ClientApp process
    if config.privacy_unit == "patient" and privacy is not None:
        update = train_patient_level(model, data, config, privacy, generator, secure_noise=deployed,
                                     fresh_process=deployed)
    else:
        update = train_locally(model, data, config, privacy, generator, secure_noise=deployed,
                               fresh_process=deployed)
    raw_delta = _numpy(update.delta)
    delta, clipped = clip_l2(flatten(raw_delta), config.update_clip_norm)
    records = RecordDict({
        messages.STATUS: ConfigRecord({"state": messages.STATE_TRAINED, "reason": ""}),
        messages.UPDATE: ArrayRecord({k: Array(v) for k, v in unflatten(delta, raw_delta).items()}),
        # No training loss: it is computed on the private images without noise, so sending it would break
        # the claim that everything a site releases is DP. The example count is public metadata (see README).
        messages.TRAIN_METRICS: MetricRecord({
            "site": site, "num-examples": update.num_examples, "steps": update.steps, "update-clipped": int(clipped),
        }),
    })
    if evaluation is not None:
        records[messages.EVAL_METRICS] = evaluation
    if privacy is not None:
        # the round's ledger entry is committed before the update can leave the site
        try:
            entry = ledger.append(ledger_entry(admission, privacy, data.fingerprint,
                                               lifetime_spent(admission, ledger, privacy), max_per_patient))
        except (LedgerError, sqlite3.Error, OSError) as err:  # e.g. the disk filled up while it trained
            log(WARNING, "the round's ledger entry could not be committed: %s", err)
            return refuse(content, context, SiteSetupError("the round's ledger entry could not be committed; "
                                                           "its update is withheld"), data.fingerprint)
        records[messages.PRIVACY_REPORT] = privacy_report(site, privacy, max_per_patient, entry)
        after_reply.later(functools.partial(warm_next_round, admission, ledger, privacy))
    return records


def keep_derived_on_disk(context: Context, admission: Admission) -> bool:
    """A deployed site (it is, when this returns True) runs each message in a new process: what it derives from
    its images (ScatterNet's features), from public accounting quantities (noise calibration, epsilons) and its
    compiled DP-SGD kernels are kept in its state folder for the next process (torch's own kernel cache would be
    in /tmp)."""
    if is_simulated(context):
        return False
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(admission.state_dir / "compiled"))
    keep_features_on_disk(admission.state_dir / "features")
    memo.keep_in(admission.state_dir / "accountant.sqlite")
    return True


def warm_next_round(admission: Admission, ledger: PrivacyLedger, privacy: SitePrivacy) -> None:
    """After the round's reply has left (client.after_reply), the accountant's numbers the site's next round of
    this run asks for: its epsilons after one more round at the same noise, rate and steps, alone and composed
    with the ledger's other runs (`check_budgets`), the independent epsilon its entry will hold, and whether it
    could afford the round after (its privacy report says). They land in the accountant's results file, where
    the next round's process finds them, off the round's critical path."""
    if not privacy.can_afford_next_round():
        return
    with contextlib.suppress(PolicyRefusal):
        check_budgets(admission, ledger, privacy)
    after_next = planned_history(privacy, 1)
    independent_epsilon(after_next, privacy.delta)
    dataclasses.replace(privacy, history=list(after_next)).can_afford_next_round()


def evaluate_site(content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the global model on this site's local test split (never used for training)."""
    try:
        admission = admit(MessageType.EVALUATE, content, context)
        model = global_model_for(admission, content)  # before any data is read
    except GATE_ERRORS as err:
        return refuse(content, context, err)
    torch.set_num_threads(admission.config.client_threads)
    keep_derived_on_disk(context, admission)
    data = site_data(context, admission)
    return RecordDict({messages.EVAL_METRICS: _evaluation(admission, model.to(site_device(admission.config)), data)})


def _evaluation(admission: Admission, model: torch.nn.Module, data: SiteData) -> MetricRecord | None:
    """The model's loss and accuracy on the site's local test split (never trained on), where its policy lets
    metrics leave. A training round evaluates the model it received, so no exchange of its own is needed."""
    if not admission.policy.send_evaluation_metrics:
        return None
    scored, inputs = trained_part(model, data.test_x)  # ScatterNet: its features, computed once per process
    loss, accuracy = evaluate_model(scored, inputs, data.test_y)
    return MetricRecord({"site": admission.site, "num-examples": len(data.test_y), "loss": loss,
                         "accuracy": accuracy})


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}
