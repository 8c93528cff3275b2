"""What the coordinator would like each site to run: mark the site's state folder and list its images."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

MARKER = "foreign-app-ran"
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    (Path(str(context.node_config["state-dir"])) / MARKER).write_text("the coordinator's code ran at this site")
    images = sorted(str(p) for p in Path(str(context.node_config["data"])).rglob("*.png"))[:5]
    return Message(RecordDict({"config": ConfigRecord({"marker": MARKER, "images": images})}), reply_to=msg)
