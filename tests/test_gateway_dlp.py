"""The gateway's DLP stage on a real mesh: what a payload must not carry is masked in the copy
delivered, or refused to its sender, or let through and recorded; the size cap refuses before
parsing; and no value found appears in a notice, a log line or the audit trail."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from agents_reliability import Host, host, peek, subscriber
from helpers import decision_of, principals, running

from behaviours import SubscriberBehaviour
from mesh import Message, Settings, on
from mesh.gateway import Gateway

POLICY = """
principals:
  vehicles: {kind: agent, agents: ["v[0-9]*"]}
  monitor: {kind: agent}
  gateway: {kind: gateway}
rule_sets:
  telemetry:
    rules:
      - {allow: publish, who: vehicles, topics: "vehicle.{self}.#"}
      - {allow: subscribe, who: monitor, topics: "vehicle.#"}
schemas:
  require: ["vehicle.*.log"]   # the size cap refuses before the schema stage parses anything
dlp:
  max_payload_bytes: 2048
  rules:
    - {detect: [phone, email], action: redact, topics: "vehicle.*.trip"}
    - {detect: card, action: block}
    - {detect: iban, action: alert}
"""

PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
IBAN = "GB82 WEST 1234 5698 7654 32"
SECRETS = (PHONE, CARD, IBAN, "7946", "4111", "1234 5698")


class Vehicle(Host):
    """Keeps the gateway's error notices about what it sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notices: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_error_notice(self, message: Message) -> None:
        self.notices.put_nowait(message.payload)

    async def notice_about(self, message_id: str) -> dict[str, Any]:
        while True:
            notice = await asyncio.wait_for(self.notices.get(), 15)
            if notice.get("message_id") == message_id:
                return notice


class Watch(SubscriberBehaviour):
    @on("vehicle.#")
    async def reading(self, msg: Message, payload: object) -> None:
        host(self).seen.put_nowait(msg)


async def test_dlp_masks_refuses_or_records_and_never_tells_a_value(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with principals(settings, policy) as settings_for:
        gateway = Gateway(settings=await settings_for("gateway"))
        monitor = subscriber(await settings_for("monitor"), Watch, agent_id="monitor")
        v7 = Vehicle("v7", settings=await settings_for("vehicles"))
        async with running(gateway, monitor, v7), peek(settings) as broker:
            trip = {"driver": "Sam", "contact": PHONE, "mail": "sam@example.com", "note": "ok"}
            redacted = await v7.publish("vehicle.v7.trip", trip)
            carded = await v7.publish("vehicle.v7.pay", {"card": CARD})
            alerted = await v7.publish("vehicle.v7.bank", {"iban": IBAN})
            big = await v7.publish("vehicle.v7.log", {"blob": "x" * 4096})

            masked = await asyncio.wait_for(monitor.seen.get(), 15)
            assert masked.topic == "vehicle.v7.trip"
            assert masked.payload["contact"].endswith("0958")
            assert PHONE not in str(masked.payload)
            assert "sam@example.com" not in str(masked.payload)
            assert masked.payload["note"] == "ok"
            assert sorted(masked.redacted) == ["payload.contact", "payload.mail"]
            record = await decision_of(settings, redacted)
            assert record.decision == "redacted"
            assert sorted((f.kind, f.path) for f in record.findings) == [
                ("email", "payload.mail"),
                ("phone", "payload.contact"),
            ]

            passed = await asyncio.wait_for(monitor.seen.get(), 15)
            assert passed.topic == "vehicle.v7.bank"  # the card message never arrived
            assert passed.payload == {"iban": IBAN}  # alert: delivered as sent
            record = await decision_of(settings, alerted)
            assert (record.decision, [(f.kind, f.path) for f in record.findings]) == (
                "allowed",
                [("iban", "payload.iban")],
            )

            record = await decision_of(settings, carded)
            assert (record.decision, record.stage) == ("denied", "dlp")
            assert record.reason == "the payload holds card at payload.card"
            notice = await v7.notice_about(carded)
            assert notice["stage"] == "dlp"
            assert notice["error"] == "the payload holds card at payload.card"

            record = await decision_of(settings, big)
            assert (record.decision, record.stage) == ("denied", "dlp")
            assert "over the DLP limit of 2,048 bytes" in (record.reason or "")
            assert monitor.seen.empty()
            assert await broker.dead_letters_through_marker() == []  # denials are not dead letters

    for line in caplog.messages:
        for value in SECRETS:
            assert value not in line
