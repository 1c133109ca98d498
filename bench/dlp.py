"""How long the DLP scanner takes per payload, by size, clean and with findings.

    python bench/dlp.py [--iterations 2000] [--sizes 256,2048,16384,65536] [--check]

Pure Python, no broker: each payload is realistic JSON (an order event with a customer,
items, a vehicle, shipping, tags, free text; a telemetry reading at 256 B) of about the
given size, parsed once, then scanned ``--iterations`` times (fewer for large sizes, at
least 200) with every built-in detector set to ``redact``, the worst case: whatever is found
is masked into a copy.  "clean" payloads hold nothing to find (but identifiers, dates, URLs,
hex trace ids and decimals that look a little like it); "findings" payloads have one planted
value (an e-mail, card, phone number, IBAN, SSN, AWS key id or JWT, in turn) per ~600 bytes
in their free-text fields.

Prints, per size and kind: median and p99 wall-clock per scan in ms, microseconds per KB
(linear growth keeps this flat), the findings per scan, and ``json.loads`` of the same body
for scale.  Target (the DLP issue): a 2 KB payload scans in <= 0.1 ms median, clean or with
a few findings (``--check``: exit 1 when missed).  Other processes' load inflates figures;
the load average is printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.dlp import DETECTORS, DlpRuleSpec, Scanner

TOPIC = "orders.created"
TARGET_SIZE = 2048
TARGET_MS = 0.1
PLANTED = [
    "please write to ana.lima@example.com",
    "card 4111 1111 1111 1111 on file",
    "call me on +44 20 7946 0958 after six",
    "refund to GB82 WEST 1234 5698 7654 32",
    "ssn 078-05-1120 for the form",
    "key AKIAIOSFODNN7EXAMPLE leaked here",
    "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ2NyJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ",
]
NOTES = [
    "gift wrap please",
    "",
    "leave at the back door",
    "deliver after 6pm",
    "second attempt, customer was not home on 2024-05-02",
    "see https://shop.example.com/orders/88213/returns for the return label",
]


def telemetry(rng: random.Random) -> dict[str, Any]:
    return {
        "vehicle": f"v{rng.randrange(1000)}",
        "seq": rng.randrange(10**6),
        "ts": "2024-05-01T12:29:58.120Z",
        "speed_kmh": round(rng.uniform(0, 130), 1),
        "position": {
            "lat": round(rng.uniform(-90, 90), 6),
            "lon": round(rng.uniform(-180, 180), 6),
        },
        "status": rng.choice(["moving", "parked", "charging"]),
        "firmware": "v3.12.4",
        "note": rng.choice(NOTES),
    }


def item(rng: random.Random) -> dict[str, Any]:
    return {
        "sku": f"SKU-{rng.randrange(10000, 99999)}",
        "title": rng.choice(["USB-C cable 2m", "Brake pad set (front)", "Wiper blade 24in"]),
        "qty": rng.randrange(1, 5),
        "price": f"{rng.uniform(1, 200):.2f}",
        "currency": "EUR",
        "warehouse": rng.choice(["muc-1", "ber-2", "ham-1"]),
        "note": rng.choice(NOTES),
    }


def order(rng: random.Random) -> dict[str, Any]:
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "type": "order.created",
        "created_at": "2024-05-01T12:30:00.123Z",
        "source": "shop-eu-west-1",
        "customer": {
            "id": f"cus_{rng.getrandbits(40):x}",
            "name": "Ana Lima",
            "locale": "pt-BR",
            "tier": "gold",
            "address": {
                "street": "Rua Augusta 1508, apto 42",
                "city": "São Paulo",
                "postal_code": "01304-001",
                "country": "BR",
            },
        },
        "items": [],
        "vehicle": {
            "vin": "1HGCM82633A004352",
            "odometer_km": 120345,
            "position": {"lat": 48.1371, "lon": 11.5754},
            "updated": "2024-05-01T12:29:58Z",
        },
        "shipping": {"carrier": "DHL", "tracking": "JD014600003828391830", "eta": "2024-05-03"},
        "tags": ["priority", "eu", "repeat-customer", "campaign-spring"],
        "description": "Customer asked to combine this order with the previous one if "
        "possible; leave the parcel with the neighbour at number 12 if nobody answers.",
        "trace": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    }


def payload(size: int, rng: random.Random) -> dict[str, Any]:
    """A clean payload of about ``size`` bytes of JSON."""
    if size < 1024:
        value = telemetry(rng)
        while len(json.dumps(value)) < size - 20:
            value["note"] += " ok"
        return value
    value = order(rng)
    while len(json.dumps(value)) < size:
        value["items"].append(item(rng))
    return value


def plant(value: dict[str, Any], size: int, rng: random.Random) -> int:
    """Put one planted value per ~600 bytes into free-text fields; how many."""
    slots: list[tuple[dict[str, Any], str]] = [
        (value, "note" if "note" in value else "description")
    ]
    slots += [(i, "note") for i in value.get("items", [])]
    count = min(len(slots), max(1, size // 600))
    for n, (holder, key) in enumerate(rng.sample(slots, count)):
        holder[key] = PLANTED[n % len(PLANTED)]
    return count


def timed(call: Callable[[], object], iterations: int) -> list[float]:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return samples


def main(iterations: int, sizes: list[int]) -> int:
    scanner = Scanner([DlpRuleSpec(detect=list(DETECTORS), action="redact")])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average {load} on {os.cpu_count()} CPUs; every detector, action redact")
    print(
        f"{'size':>8} {'kind':<9} {'bytes':>7} {'median ms':>10} {'p99 ms':>8} "
        f"{'us/KB':>7} {'found':>6} {'json.loads ms':>14}"
    )
    missed = False
    for size in sizes:
        rng = random.Random(size)
        clean = payload(size, rng)
        dirty = json.loads(json.dumps(clean))
        planted = plant(dirty, size, rng)
        for kind, value in (("clean", clean), ("findings", dirty)):
            body = json.dumps(value).encode()
            found = len(scanner.scan(value, topic=TOPIC).findings)
            if kind == "findings":
                assert found >= planted, f"{found} findings of {planted} planted at {size} B"
            runs = max(200, iterations * TARGET_SIZE // max(size, TARGET_SIZE))
            scan = partial(scanner.scan, value, topic=TOPIC)
            timed(scan, runs // 10)  # warm-up
            samples = timed(scan, runs)
            median = statistics.median(samples)
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            parse = statistics.median(timed(partial(json.loads, body), runs))
            verdict = ""
            if size == TARGET_SIZE:
                ok = median <= TARGET_MS
                missed |= not ok
                verdict = "  ok" if ok else f"  over target ({TARGET_MS} ms)"
            print(
                f"{size:>8} {kind:<9} {len(body):>7} {median:>10.4f} {p99:>8.4f} "
                f"{median * 1000 / (len(body) / 1024):>7.1f} {found:>6} {parse:>14.4f}{verdict}"
            )
    return 1 if missed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="scans timed at 2 KB")
    parser.add_argument("--sizes", default="256,2048,16384,65536", help="payload sizes, bytes")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    code = main(args.iterations, [int(s) for s in args.sizes.split(",")])
    sys.exit(code if args.check else 0)
