"""CareFed's ClientApp: a hospital site. Flower loads it as `client.app:app`."""

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.egress import ALLOW_PLAIN_KEY, egress_guard
from client.identity import STATE_DIR_KEY, is_simulated
from client.policy_gate import policy_gate, simulated_site_folder
from client.secagg_mod import next_round_mod, secagg_mod
from client.simulated_faults import fault_mod
from common.logs import tidy_logging

tidy_logging()


def _egress_log_dir(context: Context, request: RecordDict) -> Path | None:
    if STATE_DIR_KEY in context.node_config:
        return Path(str(context.node_config[STATE_DIR_KEY])).expanduser()
    return simulated_site_folder(context, request) if is_simulated(context) else None


def _plain_allowed(context: Context) -> bool:
    return is_simulated(context) or str(context.node_config.get(ALLOW_PLAIN_KEY, "false")).lower() == "true"


# Outermost first. egress_guard checks every reply as it leaves (after masking); next_round_mod answers the next
# round's advertise request that rides on an unmask request as a request of its own, through everything below;
# policy_gate refuses, by name, any request beyond the site's policy before anything is computed; fault_mod:
# scenario-driven dropouts, simulated sites only; secagg_mod: secure aggregation (plain messages pass through).
app = ClientApp(mods=[egress_guard(_egress_log_dir, plain_allowed=_plain_allowed), next_round_mod, policy_gate,
                      fault_mod, secagg_mod])


# client.site (torch, Opacus) is imported only when a message needs training or evaluation: a deployed SuperNode
# runs every message in a fresh ClientApp process, and the key-exchange and unmasking stages need neither.
@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the site's own images with DP-SGD; reply with the model delta and the privacy report."""
    from client.site import train_site

    return Message(train_site(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's local test split."""
    from client.site import evaluate_site

    return Message(evaluate_site(msg.content, context), reply_to=msg)
