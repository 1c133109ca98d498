"""Pydantic models that test policies name as schema sources (``payloads:Reading``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class Reading(BaseModel):
    vehicle: str
    speed_kmh: float = Field(ge=0, le=400)
    at: datetime | None = None


class NotAModel:
    """A class, but no pydantic model."""
