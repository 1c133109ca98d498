"""The bridge's dashboard (``mesh/bridge/static/``) end to end in headless Chromium: Debian's
``chromium`` (installed by ``mesh.devservices.ensure_program`` when missing, as root with
apt-get; else the test is skipped saying how to install it), driven by Playwright's Python
package, which never downloads a browser of its own here.

With ``MESH_DASHBOARD_SCREENSHOT=docs/dashboard.png`` the test also sends a minute's worth of
traffic and saves a screenshot of the dashboard there (the README's picture)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from bridge_support import Running, delete_users, provisioned, running_bridge
from helpers import eventually

from mesh import Settings, topology
from mesh.devservices import DevServicesError, ensure_program
from mesh.envelope import H_DEAD_BY, H_QUEUE, H_REASON, H_TOPIC, new_message_id
from mesh.policy import broker_user

playwright = pytest.importorskip("playwright.async_api", reason="pip install -e '.[dev]'")

POLICY = """\
principals:
  gateway: {kind: gateway}
  bridge: {kind: bridge}
  service: {kind: agent, agents: ["svc*"]}
  operator: {kind: user}
rule_sets:
  main:
    rules:
      - {allow: publish, who: [operator, service], topics: "notes.#"}
      - {allow: subscribe, who: [operator, service], topics: "notes.#"}
      - {allow: request, who: operator, request: {agent: "svc*", operation: "*"}}
      - {allow: reply, who: "*", reply: {agent: "*"}}
      - {allow: control, who: operator, control: {agent: "svc*", command: "*"}}
      - {allow: request, who: operator, request: {agent: gateway, operation: redrive}}
dlp:
  rules:
    - {detect: card, action: block, topics: "notes.#"}
    - {detect: phone, action: redact, topics: "notes.#"}
"""
"""``operator`` publishes and watches notes, controls ``svc`` and redrives dead letters; the
gateway refuses a note with a card number and masks phone numbers in the copy it relays."""

CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Playwright adds ``--headless`` itself, and the profile is a fresh ``--user-data-dir``."""

SCREENSHOT = os.environ.get("MESH_DASHBOARD_SCREENSHOT")
WAIT_MS = 15_000
"""How long the page may take to show what the test waits for."""


@pytest.fixture(name="chromium", scope="session")
def chromium_fixture() -> Path:
    try:
        return ensure_program(["chromium", "chromium-browser"], "chromium")
    except DevServicesError as exc:
        pytest.skip(f"the dashboard's browser test needs Debian's chromium: {exc}")


@pytest.fixture(name="live")
async def live_fixture(settings: Settings, tmp_path: Path) -> AsyncIterator[Running]:
    """The mesh of ``POLICY`` with its gateway, ``svc`` and the bridge served by uvicorn."""
    try:
        mesh = await provisioned(settings, tmp_path, POLICY)
        async with running_bridge(mesh, serve=True) as live:
            yield live
    finally:
        await delete_users(settings)


@pytest.fixture(name="page")
async def page_fixture(chromium: Path, tmp_path: Path) -> AsyncIterator[Any]:
    """A page of a fresh headless Chromium; fails the test on any script error in it."""
    errors: list[str] = []
    async with playwright.async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page
        finally:
            await context.close()
    assert not errors, f"script errors in the dashboard: {errors}"


async def publish(live: Running, topic: str, payload: object) -> str:
    answer = await live.client.post(f"/topics/{topic}", json=payload, headers=live.auth("operator"))
    assert answer.status_code == 202, answer.text
    message_id: str = answer.json()["message_id"]
    return message_id


async def dead_letter(live: Running) -> int:
    """A note ``svc``'s notes behaviour gave up on, dead-lettered by ``svc``'s own user as a
    failed handler does, once the gateway filed it: its id."""
    message_id = new_message_id()
    died = aio_pika.Message(
        b'{"text": "a note that failed"}',
        headers={
            H_QUEUE: "mesh.q.svc.notes",
            H_DEAD_BY: "svc",
            H_REASON: "handler notes.note failed 1 times; last: RuntimeError: closed",
            H_TOPIC: "notes.failed",
        },
        message_id=message_id,
        type="event",
        app_id="svc",
        content_type="application/json",
        user_id=broker_user(live.mesh.settings.namespace, "service"),  # RabbitMQ checks it
    )
    await live.service.transport.publish(topology.DEAD_LETTER_EXCHANGE, "notes.failed", died)
    found: list[int] = []

    async def filed() -> bool:
        answer = await live.client.get("/dead", headers=live.auth("operator"))
        assert answer.status_code == 200, answer.text
        found[:] = [
            d["id"] for d in answer.json()["dead_letters"] if d["message_id"] == message_id
        ]
        return bool(found)

    await eventually(filed, timeout=20, what="the dead letter filed")
    return found[0]


async def behaviour_state(live: Running, agent: str, behaviour: str) -> set[str]:
    answer = await live.client.get(f"/agents/{agent}", headers=live.auth("operator"))
    return {
        b["state"]
        for instance in answer.json()["instances"]
        for b in instance["behaviours"]
        if b["name"] == behaviour
    }


# A fresh machine installs chromium (apt-get) in the first test's time; each step below waits
# at most WAIT_MS, and the test takes about 8 s once chromium is there.
@pytest.mark.timeout(600)
async def test_the_dashboard_shows_agents_controls_them_and_streams_messages(
    live: Running, page: Any
) -> None:
    dead = await dead_letter(live)  # before the page loads: it lists dead letters at start
    token = live.mesh.token("operator")
    await page.goto(f"http://{live.url}/?access_token={token}&topics=notes.%23")
    await page.locator("#principal", has_text="signed in as operator").wait_for()
    assert "access_token" not in page.url  # out of the address bar once read

    # Agents appear, with their behaviours and states.
    notes = page.locator('[data-agent="svc"] tr[data-behaviour="notes"]')
    await notes.locator(".state", has_text="running").wait_for()

    # Stop: the state changes on the page, and in the registry.
    await notes.locator("button.stop").click()
    await notes.locator(".state", has_text="stopped").wait_for()
    assert await behaviour_state(live, "svc", "notes") == {"stopped"}
    await notes.locator("button.start").click()
    await notes.locator(".state", has_text="running").wait_for()

    # Published through REST, seen in the stream once the page's subscription holds.
    await page.locator("#filter-state", has_text="subscribed to notes.#").wait_for()
    await page.locator("#link", has_text="live").wait_for()
    await publish(live, "notes.today", {"text": "hello from the test"})
    row = page.locator('#messages li[data-topic="notes.today"]')
    await row.filter(has_text="hello from the test").wait_for()

    # A phone number masked by the gateway: highlighted with the path it masked.
    await publish(live, "notes.call", {"text": "call me", "phone": "+44 20 7946 0958"})
    redacted = page.locator('#messages li.redacted[data-topic="notes.call"]')
    await redacted.filter(has_text="payload.phone").wait_for()
    assert "7946 0958" not in await redacted.inner_text()

    # A card number refused by the gateway: in the stream and the audit tail, with the stage.
    await publish(live, "notes.pay", {"text": "my card", "card": "4111 1111 1111 1111"})
    denied = page.locator('#messages li.denied[data-topic="notes.pay"]')
    await denied.filter(has_text="dlp").wait_for()
    await page.locator('#audit tr[data-decision="denied"]', has_text="notes.pay").wait_for()

    # The chart counts them: two passed (one masked), one denied, in the last minute.
    await page.locator("#sum-passed", has_text=re.compile(r"^([2-9]|\d\d+)$")).wait_for()
    await page.locator("#sum-denied", has_text=re.compile(r"^[1-9]")).wait_for()

    # The dead letter is listed; its redrive button puts it back into svc's queue.
    listed = page.locator(f'#dead tr[data-dead="{dead}"]')
    await listed.filter(has_text="notes.failed").wait_for()
    await listed.locator("button.redrive").click()
    await page.locator("#toast", has_text=f"dead letter {dead} redriven").wait_for()

    async def handled_again() -> None:
        while (await live.service.seen.get()).topic != "notes.failed":
            pass

    await asyncio.wait_for(handled_again(), WAIT_MS / 1000)

    if SCREENSHOT:
        await traffic(live, seconds=20)
        await page.screenshot(path=SCREENSHOT, full_page=True)


async def traffic(live: Running, seconds: float) -> None:
    """Notes at a few per second, some masked, a few refused: for the screenshot's chart."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    count = 0
    while loop.time() < end:
        count += 1
        payload: dict[str, object] = {"n": count, "text": f"reading {count}"}
        if count % 7 == 0:
            payload["phone"] = "+1 415 555 2671"
        if count % 11 == 0:
            payload["card"] = "5555 5555 5555 4444"
        await publish(live, f"notes.room{count % 3}", payload)
        await asyncio.sleep(0.15)  # pacing the traffic, not waiting for anything


def test_the_page_is_self_contained() -> None:
    """No CDN, no build step: every file the page loads is in the package."""
    static = Path(__file__).parent.parent / "mesh" / "bridge" / "static"
    html = (static / "index.html").read_text()
    for name in ("dashboard.js", "dashboard.css"):
        assert f'"{name}"' in html and (static / name).is_file()
    assert "http://" not in html and "https://" not in html
