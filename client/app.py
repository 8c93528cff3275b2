"""CareFed's ClientApp: a hospital site. Flower loads it as `client.app:app`."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.secagg_mod import secagg_mod
from client.simulated_faults import fault_mod
from client.site import evaluate_site, train_site
from common.logs import tidy_logging

tidy_logging()
# fault_mod: scenario-driven dropouts, simulated sites only; secagg_mod: secure aggregation (plain messages pass)
app = ClientApp(mods=[fault_mod, secagg_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the site's own images with DP-SGD; reply with the model delta and the privacy report."""
    return Message(train_site(msg.content, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's local test split."""
    return Message(evaluate_site(msg.content, context), reply_to=msg)
