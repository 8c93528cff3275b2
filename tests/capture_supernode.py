"""Run `flower-supernode` with every request it sends to the SuperLink recorded (a test instrument).

    CAREFED_CAPTURE=/path/site.bin python tests/capture_supernode.py <carefed-supernode arguments>

Flower 1.42's SuperNode talks to the SuperLink through `ProtobufClient._unary_unary` (protobuf over HTTPS); this
wraps that one method, so the record holds exactly the bytes each request carries before TLS encrypts them: the
Fleet API path, then the serialised request. Records are appended as
<4-byte path length><path><8-byte body length><body>. Nothing else about the SuperNode changes: it runs as
`carefed-supernode` runs it, with CareFed's SuperExec beside it.
"""

from __future__ import annotations

import os
import struct
import sys
import threading

from flwr.supercore.protobuf.client import ProtobufClient

_original = ProtobufClient._unary_unary
_lock = threading.Lock()


def _capturing(self, *, path, rpc_method, request, response_type, timeout=None):
    body = request.SerializeToString(deterministic=True)
    raw_path = path.encode()
    with _lock, open(os.environ["CAREFED_CAPTURE"], "ab") as out:
        out.write(struct.pack(">I", len(raw_path)) + raw_path + struct.pack(">Q", len(body)) + body)
    return _original(self, path=path, rpc_method=rpc_method, request=request, response_type=response_type,
                     timeout=timeout)


def read_capture(path: str) -> list[tuple[str, bytes]]:
    with open(path, "rb") as f:
        data = f.read()
    records, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from(">I", data, at)
        name = data[at + 4:at + 4 + n].decode()
        (m,) = struct.unpack_from(">Q", data, at + 4 + n)
        start = at + 12 + n
        records.append((name, data[start:start + m]))
        at = start + m
    return records


if __name__ == "__main__":
    ProtobufClient._unary_unary = _capturing
    from client.supernode import run

    sys.exit(run(sys.argv[1:]))
