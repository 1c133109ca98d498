"""The built-in detectors' names, which are also the kinds of what they find."""

from __future__ import annotations

from typing import Literal, get_args

Detector = Literal[
    "card",
    "iban",
    "ssn",
    "email",
    "phone",
    "aws_access_key",
    "aws_secret_key",
    "gcp_api_key",
    "azure_key",
    "private_key",
    "jwt",
    "bearer_token",
    "secret",
]
DETECTORS: tuple[Detector, ...] = get_args(Detector)

CARD: Detector = "card"
IBAN: Detector = "iban"
SSN: Detector = "ssn"
EMAIL: Detector = "email"
PHONE: Detector = "phone"
AWS_ACCESS_KEY: Detector = "aws_access_key"
AWS_SECRET_KEY: Detector = "aws_secret_key"
GCP_API_KEY: Detector = "gcp_api_key"
AZURE_KEY: Detector = "azure_key"
PRIVATE_KEY: Detector = "private_key"
JWT: Detector = "jwt"
BEARER_TOKEN: Detector = "bearer_token"
SECRET: Detector = "secret"
"""A high-entropy value next to a key word (``api_key``, ``token``, ``password``, ...)."""

LAST_FOUR: frozenset[str] = frozenset({CARD, IBAN, SSN, PHONE})
"""Kinds whose redaction keeps the last four characters, as receipts and statements do;
everything else is masked whole."""
