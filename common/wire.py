"""How protocol values travel in Flower records: node ids as 8-byte strings (ConfigRecord ints are signed
64-bit, Flower node ids are unsigned 64-bit), the protocol config as a flat record."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from typing import Any

from common.secagg.keys import node_bytes
from common.secagg.protocol import ProtocolConfig


def ids_to_wire(ids: Iterable[int]) -> list[bytes]:
    return [node_bytes(u) for u in ids]


def ids_from_wire(raw: Iterable[bytes]) -> list[int]:
    out = []
    for item in raw:
        if not isinstance(item, bytes) or len(item) != 8:
            raise ValueError("node ids travel as 8-byte strings")
        out.append(int.from_bytes(item, "big"))
    return out


def protocol_config_to_record(config: ProtocolConfig) -> dict[str, Any]:
    return {f"protocol-{k}": v for k, v in asdict(config).items()}


def protocol_config_from_record(record: Mapping[str, Any]) -> ProtocolConfig:
    values = {f.name: record[f"protocol-{f.name}"] for f in fields(ProtocolConfig)}
    return ProtocolConfig(**values)
