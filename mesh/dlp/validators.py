"""Checks that tell a real value from a look-alike: checksums, issuer ranges, number plans.

Each takes the candidate's characters (digits or letters only, separators already gone
where that matters) and answers yes or no; none raises, whatever it is given.  Small enough
to keep here rather than depend on python-stdnum or phonenumbers: Luhn and mod 97 are a few
lines, and the tables below are stable public registries.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import string
from collections import Counter

# (lowest prefix, highest prefix, card lengths): the IIN ranges of the networks that issue
# cards today.  Prefixes of one row have the same number of digits.
_SIXTEEN_UP = frozenset(range(16, 20))
_CARD_RANGES: tuple[tuple[str, str, frozenset[int]], ...] = (
    ("4", "4", frozenset({13, 16, 19})),  # Visa
    ("51", "55", frozenset({16})),  # Mastercard
    ("2221", "2720", frozenset({16})),  # Mastercard 2-series
    ("34", "34", frozenset({15})),  # American Express
    ("37", "37", frozenset({15})),
    ("6011", "6011", _SIXTEEN_UP),  # Discover
    ("644", "649", _SIXTEEN_UP),
    ("65", "65", _SIXTEEN_UP),
    ("62", "62", _SIXTEEN_UP),  # UnionPay
    ("3528", "3589", _SIXTEEN_UP),  # JCB
    ("300", "305", frozenset(range(14, 20))),  # Diners Club
    ("3095", "3095", frozenset(range(14, 20))),
    ("36", "36", frozenset(range(14, 20))),
    ("38", "39", _SIXTEEN_UP),
    ("2200", "2204", _SIXTEEN_UP),  # Mir
    ("5018", "5018", frozenset(range(13, 20))),  # Maestro
    ("5020", "5020", frozenset(range(13, 20))),
    ("5038", "5038", frozenset(range(13, 20))),
    ("5893", "5893", frozenset(range(13, 20))),
    ("6304", "6304", frozenset(range(13, 20))),
    ("6759", "6759", frozenset(range(13, 20))),
    ("6761", "6763", frozenset(range(13, 20))),
    ("60", "60", frozenset({16})),  # RuPay
    ("81", "82", frozenset({16})),
    ("508", "508", frozenset({16})),
    ("353", "353", frozenset({16})),
    ("356", "356", frozenset({16})),
    ("506099", "506198", frozenset({16, 18, 19})),  # Verve
    ("650002", "650027", frozenset({16, 18, 19})),
    ("9792", "9792", frozenset({16})),  # Troy
)
_CARD_BY_FIRST: dict[str, tuple[tuple[str, str, frozenset[int]], ...]] = {
    first: tuple(r for r in _CARD_RANGES if r[0][0] == first) for first in "0123456789"
}

# ISO 13616: for the checksum, A is 10, B is 11, ... Z is 35.
_LETTER_NUMBERS = str.maketrans({c: str(10 + i) for i, c in enumerate(string.ascii_uppercase)})

IBAN_LENGTHS: dict[str, int] = {
    # SWIFT's IBAN registry (release 101): country code -> IBAN length.
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip

_CALLING_CODES = (
    # ITU-T E.164 country calling codes in service (no code is a prefix of another).
    1, 7, 20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53,
    54, 55, 56, 57, 58, 60, 61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98,
    211, 212, 213, 216, 218, 220, 221, 222, 223, 224, 225, 226, 227, 228, 229, 230, 231, 232,
    233, 234, 235, 236, 237, 238, 239, 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250,
    251, 252, 253, 254, 255, 256, 257, 258, 260, 261, 262, 263, 264, 265, 266, 267, 268, 269,
    290, 291, 297, 298, 299, 350, 351, 352, 353, 354, 355, 356, 357, 358, 359, 370, 371, 372,
    373, 374, 375, 376, 377, 378, 380, 381, 382, 383, 385, 386, 387, 389, 420, 421, 423, 500,
    501, 502, 503, 504, 505, 506, 507, 508, 509, 590, 591, 592, 593, 594, 595, 596, 597, 598,
    599, 670, 672, 673, 674, 675, 676, 677, 678, 679, 680, 681, 682, 683, 685, 686, 687, 688,
    689, 690, 691, 692, 800, 808, 850, 852, 853, 855, 856, 870, 878, 880, 881, 882, 883, 886,
    888, 960, 961, 962, 963, 964, 965, 966, 967, 968, 970, 971, 972, 973, 974, 975, 976, 977,
    979, 992, 993, 994, 995, 996, 998,
)  # fmt: skip
CALLING_CODES: frozenset[str] = frozenset(map(str, _CALLING_CODES))

# Each digit as Luhn counts it when doubled (2 * d, less 9 when that has two digits).
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn(digits: str) -> bool:
    """Whether ``digits`` (ASCII digits only) pass the Luhn checksum."""
    raw = digits.encode("ascii")
    # Sums of the ASCII codes, less 48 ('0') for each digit: the C loop of sum() over bytes.
    total = sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)
    return total % 10 == 0


def card_issued(digits: str) -> bool:
    """Whether ``digits`` lie in an issuer's range with a length that issuer uses."""
    length = len(digits)
    for low, high, lengths in _CARD_BY_FIRST.get(digits[:1], ()):
        if length in lengths and low <= digits[: len(low)] <= high:
            return True
    return False


def card(digits: str) -> bool:
    """A payment card number: 13 to 19 digits, an issuer's range, and the Luhn checksum."""
    return 13 <= len(digits) <= 19 and card_issued(digits) and luhn(digits)


def iban(chars: str) -> bool:
    """An IBAN (letters and digits only, any case): its country's length and mod 97 = 1."""
    chars = chars.upper()
    if IBAN_LENGTHS.get(chars[:2]) != len(chars) or not chars[2:4].isdigit():
        return False
    if not "02" <= chars[2:4] <= "98" or not chars.isalnum() or not chars.isascii():
        return False
    return int((chars[4:] + chars[:4]).translate(_LETTER_NUMBERS)) % 97 == 1


def ssn(digits: str) -> bool:
    """A US social security number as the SSA issues them: nine digits, area not 000, 666
    or 900-999, group not 00, serial not 0000."""
    if len(digits) != 9 or not digits.isdigit():
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def nanp(digits: str) -> bool:
    """A North American number without the country code: ten digits, area code and
    exchange each starting 2-9, the area code not a service code (N11)."""
    return (
        len(digits) == 10
        and digits.isdigit()
        and digits[0] >= "2"
        and digits[3] >= "2"
        and digits[1:3] != "11"
    )


def e164(digits: str) -> bool:
    """An international number without its ``+``: a country calling code in service, 8 to
    15 digits in all, and for +1 and +7 the ten digits those plans use."""
    if not 8 <= len(digits) <= 15 or not digits.isdigit():
        return False
    for size in (1, 2, 3):
        code = digits[:size]
        if code in CALLING_CODES:
            rest = digits[size:]
            if code == "1":
                return nanp(rest)
            if code == "7":
                return len(rest) == 10
            return len(rest) >= 6
    return False


def _b64decode(text: str, *, urlsafe: bool) -> bytes | None:
    padded = text + "=" * (-len(text) % 4)
    try:
        if urlsafe:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def jwt(token: str) -> bool:
    """A JSON Web Token: three base64url parts, the first two JSON objects, the header
    naming its algorithm (``alg``)."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    objects = []
    for part in parts[:2]:
        raw = _b64decode(part, urlsafe=True)
        if raw is None:
            return False
        try:
            objects.append(json.loads(raw))
        except (ValueError, RecursionError):  # bad JSON or UTF-8; absurdly deep nesting
            return False
    header, claims = objects
    return (
        isinstance(header, dict) and isinstance(header.get("alg"), str) and isinstance(claims, dict)
    )


def azure_key(text: str) -> bool:
    """An Azure account or shared access key: base64 of 32 or 64 random bytes."""
    raw = _b64decode(text, urlsafe=False) if len(text) % 4 == 0 else None
    return raw is not None and len(raw) in (32, 64)


def aws_secret_key(text: str) -> bool:
    """An AWS secret access key: 40 characters of base64's alphabet, random-looking."""
    return len(text) == 40 and _b64decode(text, urlsafe=False) is not None and random_looking(text)


def random_looking(text: str) -> bool:
    """Whether ``text`` looks generated rather than written: at least 8 characters, no
    whitespace, two or more kinds of character (lower, upper, digit, other), and a
    Shannon entropy per character near what random text of its length would have."""
    length = len(text)
    if length < 8 or any(c.isspace() for c in text):
        return False
    kinds = (
        any(c.islower() for c in text)
        + any(c.isupper() for c in text)
        + any(c.isdigit() for c in text)
        + any(not c.isalnum() for c in text)
    )
    if kinds < 2:
        return False
    entropy = -sum(n / length * math.log2(n / length) for n in Counter(text).values())
    return entropy >= min(3.0, 0.8 * math.log2(length))
