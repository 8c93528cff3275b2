"""Names of the records CareFed's server and sites exchange (one place, so both sides agree)."""

# A request carries the study, privacy and secure-aggregation sections (common.study: one schema each).
STUDY, PRIVACY, SECURE_AGGREGATION = "study", "privacy", "secure-aggregation"
# Only the simulation engine's virtual sites get the whole run config (partitions, faults, run folder); a deployed
# site refuses any request that carries it (its paths and faults are its own).
SIMULATION = "simulation"
ROUND = "round"  # ConfigRecord: {"round": int}
GLOBAL_MODEL = "global-model"  # ArrayRecord: the global model's state dict
UPDATE = "update"  # ArrayRecord: the site's model delta (plain aggregation)
TRAIN_METRICS = "train-metrics"  # MetricRecord: site, num-examples, steps (no loss: it is not DP)
PRIVACY_REPORT = "privacy-report"  # MetricRecord: the site's privacy spend so far (see client.site)
STATUS = "status"  # ConfigRecord: {"state": "trained" | "refused" | "aborted", "reason": str}
EVAL_METRICS = "eval-metrics"  # MetricRecord: site, num-examples, loss, accuracy

STATE_TRAINED = "trained"
STATE_REFUSED = "refused"
STATE_ABORTED = "aborted"  # secure aggregation refused a request (the reason names the AbortReason)

# Secure aggregation: every stage is a `train` message with a SECAGG ConfigRecord naming the stage.
SECAGG = "secagg"
MASKED_UPDATE = "masked-update"  # ArrayRecord {"masked": uint32[model size + 2]}
STAGE_ADVERTISE = "advertise-keys"
STAGE_SHARE_KEYS = "share-keys"
STAGE_MASKED_INPUT = "masked-input"
STAGE_UNMASK = "unmask"
# The next round's advertise request rides on this round's unmask request (one exchange fewer a round); the site
# answers it beside its unmask reply: its advertisement, or the status of its refusal or abort.
SECAGG_NEXT = "secagg-next"
STATUS_NEXT = "status-next"
