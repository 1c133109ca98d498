"""RabbitMQ's password hashes: checking one the broker holds, making one for a definitions file.

A hash is base64 of a 4-byte salt followed by the digest of salt + password (UTF-8); the
digest is the user's ``hashing_algorithm`` (SHA-256 unless the broker is configured
otherwise).  See https://www.rabbitmq.com/docs/passwords#computing-password-hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SHA256 = "rabbit_password_hashing_sha256"
"""The broker's default, and what definitions files here use."""
SALT_BYTES = 4

_DIGESTS = {
    SHA256: "sha256",
    "rabbit_password_hashing_sha512": "sha512",
    "rabbit_password_hashing_md5": "md5",
}


def new_password() -> str:
    """256 random bits, URL-safe (no quoting in ``MESH_AMQP_URL``)."""
    return secrets.token_urlsafe(32)


def password_hash(password: str, salt: bytes) -> str:
    """The SHA-256 hash RabbitMQ keeps for ``password`` with ``salt``."""
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def stable_salt(user: str, password: str) -> bytes:
    """A salt that stays the same while the password does, so a definitions file written
    again is the same file.  A salt keeps equal passwords from hashing alike; random
    256-bit passwords never are."""
    return hashlib.sha256(f"{user}\n{password}".encode()).digest()[:SALT_BYTES]


def matches(password: str, stored: str, algorithm: str) -> bool:
    """Whether ``stored`` (a user's ``password_hash``) is a hash of ``password``; ``False``
    when the algorithm is not one RabbitMQ ships."""
    digest = _DIGESTS.get(algorithm or SHA256)
    try:
        raw = base64.b64decode(stored, validate=True)
    except (binascii.Error, ValueError):
        return False
    if digest is None or len(raw) <= SALT_BYTES:
        return False
    salt, expected = raw[:SALT_BYTES], raw[SALT_BYTES:]
    return hmac.compare_digest(hashlib.new(digest, salt + password.encode()).digest(), expected)
