"""One site's round, between Flower messages and the trainer: identity, persistent privacy state, replies.

The site's privacy state (budget, calibrated noise, accountant history) lives in the node's Context.state,
which Flower keeps for the node across rounds, so epsilon is composed over the whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client.identity import (
    CLASS_NAMES_KEY,
    DATA_KEY,
    DEPLOYMENT_SITE_KEY,
    LABELS_CSV_KEY,
    SKIP_UNREADABLE_KEY,
    is_simulated,
    site_id,
    site_state_dir,
)
from client.trainer import patients_per_batch, train_locally, train_patient_level
from common import messages
from common.config import RunConfig
from common.data import SiteData, load_site_data
from common.data.site import LocalDataSpec, load_deployed_site_data, load_source_for
from common.errors import DataError
from common.evaluation import evaluate_model
from common.models import build_model
from common.privacy import SitePrivacy
from common.privacy.ledger import LedgerEntry, PrivacyLedger, history_tuple
from common.update_codec import clip_l2, flatten, unflatten

PRIVACY_STATE = "carefed.site-privacy"
def noise_generator(context: Context, config: RunConfig, site: int, server_round: int) -> torch.Generator:
    """Randomness for Poisson sampling and DP noise.

    Simulations seed it from the run seed so experiments reproduce. A deployed site never lets the server choose
    its noise: it seeds from the OS (64 bits into torch's generator; Opacus's secure_mode needs torchcsprng, which
    does not install with current torch, so this is the strongest option Opacus offers today).
    """
    if is_simulated(context):
        digest = hashlib.sha256(f"{config.seed}/{site}/{server_round}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little")
    else:
        seed = int.from_bytes(os.urandom(8), "little")
    return torch.Generator().manual_seed(seed)


def site_data(context: Context, config: RunConfig, site: int) -> SiteData:
    """The site's images: its own files when deployed with a `data` node config, else the simulated partition."""
    if DATA_KEY not in context.node_config:
        if not is_simulated(context):
            raise DataError(f"this SuperNode has no '{DATA_KEY}' in its node config; start it with --node-config "
                            f"'{DEPLOYMENT_SITE_KEY}=<n> {DATA_KEY}=\"/path/to/images\"' (see `carefed site check`)")
        return load_site_data(config, site)
    node = context.node_config
    spec = LocalDataSpec(path=str(node[DATA_KEY]), labels_csv=str(node.get(LABELS_CSV_KEY, "")),
                         class_names=str(node.get(CLASS_NAMES_KEY, "")),
                         skip_unreadable=str(node.get(SKIP_UNREADABLE_KEY, "false")).lower() == "true")
    return load_deployed_site_data(config, site, spec)[0]


def model_for(config: RunConfig, data: SiteData, num_classes: int) -> torch.nn.Module:
    channels, height, _ = data.train_x.shape[1:]
    return build_model(config.model, in_channels=channels, num_classes=num_classes, image_size=height)


def site_device(config: RunConfig) -> torch.device:
    """A GPU when the run gives sites a GPU share (client-num-gpus > 0) and this node has one; else the CPU."""
    return torch.device("cuda") if config.client_num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def site_ledger(context: Context, config: RunConfig, site: int) -> PrivacyLedger:
    return PrivacyLedger(site_state_dir(context, config, site) / "ledger.sqlite")


def load_privacy(context: Context, ledger: PrivacyLedger | None = None, run_id: str = "",
                 site: int = -1) -> SitePrivacy | None:
    """The site's privacy state: from Context.state, or (after a restart) from its ledger's last entry."""
    record = context.state.get(PRIVACY_STATE)
    if record is not None:
        return SitePrivacy.from_record(dict(record))
    last = ledger.last(run_id, site) if ledger is not None else None
    if last is None:
        return None
    return SitePrivacy(last.budget, last.delta, last.noise_multiplier, last.sample_rate, last.steps_round,
                       last.clip_norm, last.planned_rounds, list(last.history))


def ledger_entry(config: RunConfig, site: int, server_round: int, privacy: SitePrivacy, epsilon: float,
                 epsilon_independent: float, max_images_per_patient: int) -> LedgerEntry:
    return LedgerEntry(
        run_id=config.run_name, round=server_round, site=site, unit=config.privacy_unit,
        sample_rate=privacy.sample_rate, noise_multiplier=privacy.noise_multiplier,
        clip_norm=privacy.max_grad_norm, steps_round=privacy.steps_per_round, steps_total=privacy.steps_total,
        planned_rounds=privacy.planned_rounds, delta=privacy.delta, epsilon=epsilon,
        epsilon_independent=epsilon_independent, budget=privacy.target_epsilon,
        max_images_per_patient=max_images_per_patient, history=history_tuple(privacy.history),
    )


def calibrate_site(config: RunConfig, data: SiteData, site: int) -> SitePrivacy:
    """The site's noise for the planned run, from what it samples (images, or patients at patient level)."""
    patient_unit = config.privacy_unit == "patient"
    units = len(np.unique(data.train_patients)) if patient_unit else data.num_train
    per_batch = patients_per_batch(config, data) if patient_unit else config.batch_size
    return SitePrivacy.calibrate(
        target_epsilon=config.budget_for(site), delta=config.target_delta, num_examples=units,
        batch_size=per_batch, local_epochs=config.local_epochs, planned_rounds=config.planned_rounds,
        max_grad_norm=config.max_grad_norm)


def save_privacy(context: Context, privacy: SitePrivacy) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord(privacy.to_record())


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
    path = site_state_dir(context, config, site) / "placement.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"round": server_round, "ray_node": node, "pid": os.getpid(), "host": socket.gethostname()})
    with path.open("a") as out:
        out.write(line + "\n")


def train_site(content: RecordDict, context: Context) -> RecordDict:
    """Run one round at this site: check the budget, train with DP-SGD, return the delta and the reports."""
    config = RunConfig.from_mapping(dict(content[messages.RUN_CONFIG]))
    server_round = int(content[messages.ROUND]["round"])
    site = site_id(context)
    torch.set_num_threads(config.client_threads)
    record_placement(context, config, site, server_round)
    data = site_data(context, config, site)
    num_classes = _num_classes(config)

    privacy, ledger = None, None
    max_per_patient = int(np.bincount(data.train_patients).max()) if data.num_train else 0
    patient_unit = config.privacy_unit == "patient"
    if config.dp:
        ledger = site_ledger(context, config, site)
        privacy = load_privacy(context, ledger, config.run_name, site) or calibrate_site(config, data, site)
        if not privacy.can_afford_next_round():
            save_privacy(context, privacy)
            reason = (f"site {site}: the next round would spend epsilon {privacy.epsilon_after_next_round():.3f} "
                      f"> budget {privacy.target_epsilon} (spent so far {privacy.epsilon():.3f}); refusing")
            return RecordDict({
                messages.STATUS: ConfigRecord({"state": messages.STATE_REFUSED, "reason": reason}),
                messages.PRIVACY_REPORT: privacy_report(site, privacy, max_per_patient),
            })

    model = model_for(config, data, num_classes)
    model.load_state_dict(content[messages.GLOBAL_MODEL].to_torch_state_dict())
    model.to(site_device(config))
    generator = noise_generator(context, config, site, server_round)
    if patient_unit and privacy is not None:
        update = train_patient_level(model, data, config, privacy, generator)
    else:
        update = train_locally(model, data, config, privacy, generator)
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
    if privacy is not None and ledger is not None:
        save_privacy(context, privacy)
        # the round's ledger entry is committed before the update can leave the site
        entry = ledger.append(ledger_entry(config, site, server_round, privacy, privacy.epsilon(),
                                           privacy.independent_epsilon(), max_per_patient))
        records[messages.PRIVACY_REPORT] = privacy_report(site, privacy, max_per_patient, entry)
    return records


def evaluate_site(content: RecordDict, context: Context) -> RecordDict:
    """Evaluate the global model on this site's local test split (never used for training)."""
    config = RunConfig.from_mapping(dict(content[messages.RUN_CONFIG]))
    site = site_id(context)
    torch.set_num_threads(config.client_threads)
    data = site_data(context, config, site)
    model = model_for(config, data, _num_classes(config))
    model.load_state_dict(content[messages.GLOBAL_MODEL].to_torch_state_dict())
    loss, accuracy = evaluate_model(model.to(site_device(config)), data.test_x, data.test_y)
    return RecordDict({messages.EVAL_METRICS: MetricRecord({
        "site": site, "num-examples": len(data.test_y), "loss": loss, "accuracy": accuracy,
    })})


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _num_classes(config: RunConfig) -> int:
    return load_source_for(config).num_classes

