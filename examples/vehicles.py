"""Vehicle telemetry: vehicles report their speed, a monitor watches and flags speeding.

Run a gateway, two vehicles and a monitor (what ``make demo`` does):

    mesh gateway &
    mesh run examples.vehicles:Vehicle --id v7 &
    mesh run examples.vehicles:Vehicle --id v8 &
    mesh run examples.vehicles:Monitor --id monitor

``mesh demo`` runs them provisioned from ``examples/policy.yaml``, each process as its
principal's broker user, with an ``Intruder`` whose spoofed reading the gateway denies.
"""

from __future__ import annotations

import random

from pydantic import BaseModel

from behaviours import OneShotBehaviour, PeriodicBehaviour, SubscriberBehaviour
from mesh import Agent, Message, on, rpc


class Reading(BaseModel):
    vehicle: str
    speed_kmh: float


class Alert(BaseModel):
    vehicle: str
    speed_kmh: float
    limit_kmh: float


class Report(PeriodicBehaviour):
    """Publishes the vehicle's speed once a second."""

    period = 1.0

    async def tick(self) -> None:
        speed = round(random.gauss(100, 15), 1)
        await self.publish(
            f"vehicle.{self.agent.id}.speed",
            Reading(vehicle=self.agent.id, speed_kmh=speed),
            schema="reading@1",  # the version examples/policy.yaml checks it against
        )


class Trip(BaseModel):
    vehicle: str
    driver: str
    contact: str
    note: str


class TripLog(PeriodicBehaviour):
    """Logs the trip every few seconds, naming the driver and how to reach them: the demo
    policy has the gateway mask the phone number before anyone else sees it."""

    period = 4.0

    async def tick(self) -> None:
        await self.publish(
            f"vehicle.{self.agent.id}.trip",
            Trip(
                vehicle=self.agent.id,
                driver="Sam Doe",
                contact="+44 20 7946 0958",
                note="on schedule",
            ),
        )


class Brake(SubscriberBehaviour):
    """Acknowledges alerts about this vehicle."""

    @on("alerts.speeding.*", model=Alert)
    async def alert(self, msg: Message, alert: Alert) -> None:
        if alert.vehicle == self.agent.id:
            print(
                f"{self.agent.id}: slowing down ({alert.speed_kmh} > {alert.limit_kmh} km/h)",
                flush=True,
            )


class Vehicle(Agent):
    capabilities = ["telemetry"]
    behaviours = [Report, TripLog, Brake]

    @rpc("status")
    async def status(self, msg: Message, _: object) -> dict[str, object]:
        return {"vehicle": self.id, "instance": self.instance}


class Watch(SubscriberBehaviour):
    """Prints every reading as it flows and raises an alert above the limit."""

    limit_kmh = 120.0

    @on("vehicle.*.speed", model=Reading)
    async def speed(self, msg: Message, reading: Reading) -> None:
        print(
            f"monitor: {msg.topic:<20} {reading.speed_kmh:6.1f} km/h  "
            f"(from {msg.app_id}, verified user {msg.user_id})",
            flush=True,
        )
        if reading.speed_kmh > self.limit_kmh:
            await self.publish(
                f"alerts.speeding.{reading.vehicle}",
                Alert(
                    vehicle=reading.vehicle, speed_kmh=reading.speed_kmh, limit_kmh=self.limit_kmh
                ),
            )


class TripWatch(SubscriberBehaviour):
    """Prints trip logs as they arrive: masked where the gateway redacted them."""

    @on("vehicle.*.trip", model=Trip)
    async def trip(self, msg: Message, trip: Trip) -> None:
        masked = f"  (redacted by the gateway: {', '.join(msg.redacted)})" if msg.redacted else ""
        print(f"monitor: {msg.topic:<20} {trip.driver}, {trip.contact}{masked}", flush=True)


class Monitor(Agent):
    capabilities = ["monitoring"]
    behaviours = [Watch, TripWatch]


class Spoof(OneShotBehaviour):
    """Sends one reading in another vehicle's name: the demo policy lets a vehicle speak for
    itself only, so the gateway denies it and tells this agent why."""

    async def run(self) -> None:
        await self.publish(
            "vehicle.v7.speed", Reading(vehicle="v7", speed_kmh=300.0), schema="reading@1"
        )


class Garble(OneShotBehaviour):
    """Sends a reading of its own that does not follow the schema it names: the gateway
    refuses it, saying where and why."""

    async def run(self) -> None:
        await self.publish(
            f"vehicle.{self.agent.id}.speed",
            {"vehicle": self.agent.id, "speed_kmh": "fast"},
            schema="reading@1",
        )


class Intruder(Agent):
    """A vehicle that tries to speak for another, and sends a reading that breaks its schema
    (``mesh demo`` runs one as ``v9``)."""

    behaviours = [Spoof, Garble]
