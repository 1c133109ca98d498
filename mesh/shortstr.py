"""AMQP short strings that are not UTF-8 decoded with replacement characters, not an error.

AMQP lets a short string (``app_id``, ``message_id``, a header's name) hold any octets, and
RabbitMQ passes them on.  pamqp 4 decodes them as strict UTF-8 and lets the error end the
whole connection (its long strings were made tolerant upstream, gmr/pamqp#40; short strings
were not): one message from any sender would cut the consumer, the gateway above all, off the
broker, and again at every redelivery.  Decoded with U+FFFD instead, the message reaches the
gateway, whose decode stage refuses a sender that is no agent id.
"""

from __future__ import annotations

import struct

from pamqp import common, decode


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
        return length + 1, value[1 : length + 1].decode("utf-8", "replace")
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err


def tolerate_undecodable_short_strings() -> None:
    """Make pamqp decode short strings leniently (idempotent; called before connecting)."""
    decode.short_str = _short_str
    decode.METHODS["shortstr"] = _short_str
