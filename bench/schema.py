"""What the gateway's schema stage costs per message: the lookup by routing key and one
validation, for payloads that pass and payloads that fail.

    python bench/schema.py [--messages 20000] [--topics 1000]

Pure CPU, no broker: the stage awaits nothing.  Two schemas: the demo's reading (4 properties,
one date-time format) and an order of 20 properties with nested items.  Routing keys cycle
through ``--topics`` vehicles, so the per-key cache is exercised as a live mesh would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.envelope import H_SCHEMA
from mesh.gateway.pipeline import Denied
from mesh.gateway.schema import SchemaCheck
from mesh.policy import parse_policy

ORDER_PROPERTIES = {f"field{i:02d}": {"type": "string", "maxLength": 64} for i in range(16)}
POLICY = {
    "principals": {"vehicles": {"kind": "agent", "agents": ["v*"]}},
    "schemas": {
        "definitions": {
            "reading": [
                {
                    "version": 1,
                    "inline": {
                        "type": "object",
                        "properties": {
                            "vehicle": {"type": "string"},
                            "speed_kmh": {"type": "number", "minimum": 0, "maximum": 400},
                            "at": {"type": "string", "format": "date-time"},
                            "tags": {"type": "array", "items": {"type": "string"}},
                        },
                        "required": ["vehicle", "speed_kmh"],
                        "additionalProperties": False,
                    },
                }
            ],
            "order": [
                {
                    "version": 1,
                    "inline": {
                        "type": "object",
                        "properties": {
                            **ORDER_PROPERTIES,
                            "id": {"type": "string", "format": "uuid"},
                            "total": {"type": "number"},
                            "lines": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "sku": {"type": "string"},
                                        "qty": {"type": "integer", "minimum": 1},
                                    },
                                    "required": ["sku", "qty"],
                                },
                            },
                        },
                        "required": ["id", "total", "lines"],
                    },
                }
            ],
        },
        "payloads": [
            {"topics": "vehicle.*.speed", "accept": "reading@1"},
            {"topics": "orders.#", "accept": "order@1"},
        ],
    },
}
READING = {"vehicle": "v7", "speed_kmh": 88.5, "at": "2024-05-01T12:00:00Z", "tags": ["a", "b"]}
ORDER = {
    **{name: "x" * 20 for name in ORDER_PROPERTIES},
    "id": "6f1c2a4e-8a2b-4c1d-9e3f-0a1b2c3d4e5f",
    "total": 12.5,
    "lines": [{"sku": f"s{i}", "qty": 2} for i in range(10)],
}


@dataclass
class _Incoming:
    body: bytes


@dataclass
class _Passage:
    incoming: _Incoming
    routing_key: str
    headers: dict[str, Any]


async def measure(stage: SchemaCheck, passages: list[_Passage]) -> tuple[float, float, int]:
    """Wall and CPU microseconds per message, and how many were denied."""
    denied = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for passage in passages:
        try:
            await stage(passage)  # type: ignore[arg-type]
        except Denied:
            denied += 1
    n = len(passages)
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6, denied


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--topics", type=int, default=1_000)
    args = parser.parse_args()
    stage = SchemaCheck(parse_policy(json.dumps(POLICY)).schemas)
    cases = {
        "reading, valid": ("vehicle.v{}.speed", "reading@1", READING),
        "reading, fails": ("vehicle.v{}.speed", "reading@1", {**READING, "speed_kmh": "x"}),
        "order, valid": ("orders.v{}.new", "order@1", ORDER),
        "order, fails": ("orders.v{}.new", "order@1", {**ORDER, "lines": [{"sku": 1}]}),
        "no schema (passes)": ("alerts.v{}.x", None, READING),
    }
    print(f"{args.messages} messages per case over {args.topics} routing keys")
    for name, (key, named, payload) in cases.items():
        body = json.dumps(payload).encode()
        headers = {} if named is None else {H_SCHEMA: named}
        passages = [
            _Passage(_Incoming(body), key.format(i % args.topics), headers)
            for i in range(args.messages)
        ]
        await measure(stage, passages[: args.topics])  # the keys' first lookups
        wall, cpu, denied = await measure(stage, passages)
        print(
            f"  {name:<20} {len(body):5d} bytes  {wall:7.1f} µs/msg  cpu {cpu:7.1f} µs  "
            f"denied {denied}"
        )


if __name__ == "__main__":
    asyncio.run(main())
