"""The coordinator's ServerApp: one train message to every site; each reply written to run-config `report`."""

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"config": ConfigRecord({"ask": "your images"})}), dst_node_id=node,
                    message_type="train") for node in nodes]
    replies = grid.send_and_receive(asks, timeout=180)
    Path(str(context.run_config["report"])).write_text(json.dumps({
        "nodes": len(nodes),
        "replies": [{"error": reply.error.reason if reply.has_error() else None,
                     "content": None if reply.has_error() else repr(reply.content)} for reply in replies]}))
