"""Key names that say a secret follows: ``api_key``, ``password``, ``AccountKey``, ``ssn``.

A name is compared in lower case with everything but letters and digits dropped, so
``X-Api-Key``, ``apiKey`` and ``api_key`` are one name.  ``secret_kind`` tells which
detector judges the value under such a name; ``ssn_context`` lets a bare nine-digit number
count as a social security number (with separators it needs no context).
"""

from __future__ import annotations

import re
from functools import lru_cache

from mesh.dlp.kinds import AWS_SECRET_KEY, AZURE_KEY, SECRET

# Anywhere in the name, or at its end only (``token`` but not ``tokenizer``).
_CONTAINS = ("password", "passwd", "secret", "apikey", "privatekey", "accesskey", "credential")
_ENDS = ("token", "pwd", "auth", "authorization", "signature", "sig", "passphrase", "apisecret")
_AWS = ("secretaccesskey", "awssecretkey")
_AZURE = ("accountkey", "sharedaccesskey", "storagekey")
_NOT_NAME = re.compile(r"[^a-z0-9]+")
_SSN_WORDS = re.compile(r"(?i)(?<![a-z])ssns?(?![a-z])|social[ _-]?security")

KV_SUFFIXES: frozenset[str] = frozenset(w[-3:] for w in (*_CONTAINS, *_ENDS, *_AWS, *_AZURE))
"""The last three letters of every key word: in running text (``api_key=...``) a cheap
look-behind for these picks the separators worth a closer look."""


def normal(name: str) -> str:
    """``X-Api-Key`` → ``xapikey``."""
    return _NOT_NAME.sub("", name.lower())


@lru_cache(maxsize=4096)  # the same few field names, message after message
def secret_kind(name: str) -> str | None:
    """The detector for a value under the key ``name``, or ``None`` for an ordinary key."""
    plain = normal(name)
    if plain.endswith(_AWS):
        return AWS_SECRET_KEY
    if plain.endswith(_AZURE):
        return AZURE_KEY
    if any(word in plain for word in _CONTAINS) or plain.endswith(_ENDS):
        return SECRET
    return None


@lru_cache(maxsize=4096)
def ssn_context(name: str) -> bool:
    """Whether a key named ``name`` holds social security numbers."""
    plain = normal(name)
    return plain.endswith("ssn") or "socialsecurity" in plain


def mentions_ssn(text: str) -> bool:
    """Whether free text speaks of a social security number."""
    return _SSN_WORDS.search(text) is not None
