"""Who this node is and where it keeps its files: light enough for the ClientApp's secure-aggregation stages,
which must not import torch (a deployed SuperNode starts a fresh ClientApp process for every message)."""

from __future__ import annotations

from flwr.app import Context

STATE_DIR_KEY = "state-dir"  # a deployed site's own folder for its ledger (node_config)
SIMULATION_SITE_KEY = "partition-id"  # set by Flower's simulation engine for each virtual SuperNode
DEPLOYMENT_SITE_KEY = "site-id"  # set by a partner site with `flower-supernode --node-config "site-id=3"`
# A deployed site's own images (node_config): a class-folder tree, a CSV manifest, or DICOM files + labels CSV
DATA_KEY, LABELS_CSV_KEY, CLASS_NAMES_KEY, SKIP_UNREADABLE_KEY = "data", "labels-csv", "class-names", "skip-unreadable"
WITHOUT_PATIENT_KEY = "images-without-patient-id"  # explicit opt-in: files without a patient id, one patient each


def site_id(context: Context) -> int:
    for key in (DEPLOYMENT_SITE_KEY, SIMULATION_SITE_KEY):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError(f"node_config has neither '{DEPLOYMENT_SITE_KEY}' nor '{SIMULATION_SITE_KEY}'; start the "
                     f"SuperNode with --node-config \"{DEPLOYMENT_SITE_KEY}=<n>\".")


def is_simulated(context: Context) -> bool:
    """Only Flower's simulation engine sets partition-id without a site-id; deployed sites always set site-id."""
    return SIMULATION_SITE_KEY in context.node_config and DEPLOYMENT_SITE_KEY not in context.node_config
