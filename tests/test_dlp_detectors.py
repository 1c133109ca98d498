"""DLP detectors: real examples found, near misses (bad checksums, ranges, lengths, shapes)
left alone, for every built-in detector.  Pure logic: no broker, no Redis."""

from __future__ import annotations

import base64
import json

import pytest

from mesh.dlp import DETECTORS, DlpRuleSpec, Scanner
from mesh.dlp import validators as check

EVERYTHING = Scanner([DlpRuleSpec(detect=list(DETECTORS), action="alert")])


def kinds(value: object) -> list[str]:
    return sorted({f.kind for f in EVERYTHING.scan(value).findings})


def b64url(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9l"
    "IiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
AZURE_KEY = base64.b64encode(bytes(range(64))).decode()
GCP_KEY = "AIza" + "SyA-k3Jd8fH2lQ0pZ7xW4vB9nM1cR6tY5uE"  # AIza and 35
PEM_BODY = base64.b64encode(bytes(range(200))).decode()
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY[:64]}\n{PEM_BODY[64:]}\n-----END PRIVATE KEY-----"

FOUND = {
    "card": [
        "4111111111111111",
        "4012 8888 8888 1881",
        "5555-5555-5555-4444",
        "2223003122003222",
        "amex 378282246310005 ok",
        "3714 496353 98431",
        "6011111111111117",
        "3530111333300000",
        "30569309025904",
        "6200000000000005",
        "6759649826438453",
        "paid with 12 4111 1111 1111 1111 yesterday",
    ],
    "iban": [
        "GB82 WEST 1234 5698 7654 32",
        "DE89370400440532013000",
        "DE89 3704 0044 0532 0130 00",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
        "ES91 2100 0418 4502 0005 1332",
        "IT60 X054 2811 1010 0000 0123 456",
        "CH93 0076 2011 6238 5295 7",
        "NO93 8601 1117 947",
        "PL61 1090 1014 0000 0712 1981 2874",
        "pay to SA03 8000 0000 6080 1016 7519 please",
        "BR9700360305000010009795493P1",
    ],
    "ssn": ["078-05-1120", "ssn 536 90 4399", "123.45.6789", "SSN: 536904399"],
    "email": [
        "ana.lima@example.com",
        "write to first.last+tag@mail.example.co.uk today",
        "x_y%z@sub-domain.example.org",
    ],
    "phone": [
        "+1 415 555 2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+49 30 12345678",
        "+33 1 23 45 67 89",
        "(415) 555-2671",
        "call 415-555-2671 now",
        "415.555.2671",
        "1 415 555 2671",
        "020 7946 0958",
        "01 23 45 67 89",
        "0044 20 7946 0958",
    ],
    "aws_access_key": ["AKIAIOSFODNN7EXAMPLE", "id=ASIAY34FZKBOKMUTVV7A;"],
    "aws_secret_key": [
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        'AWS_SECRET_ACCESS_KEY="je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY"',
    ],
    "gcp_api_key": [GCP_KEY, f"key={GCP_KEY}&q=1"],
    "azure_key": [
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURE_KEY};"
        "EndpointSuffix=core.windows.net",
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;"
        f"SharedAccessKey={base64.b64encode(bytes(range(32))).decode()}",
    ],
    "private_key": [
        PEM,
        PEM.replace("PRIVATE KEY", "RSA PRIVATE KEY"),
        PEM.replace("PRIVATE KEY", "OPENSSH PRIVATE KEY"),
        json.dumps({"type": "service_account", "private_key": PEM}),  # escaped newlines
        f"-----BEGIN EC PRIVATE KEY-----\n{PEM_BODY}",  # cut off before its END
    ],
    "jwt": [JWT, f"session={JWT}; path=/"],
    "bearer_token": [
        "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "bearer AbC.dEf-123_456~xyz/78",
    ],
    "secret": [
        "api_key=Zx9Kq2Lm8Np4Rt6V",
        'config {"client_secret": "d8F3kL9pQ2mN7vX1"}',
        "password: Tr0ub4dor&3",
        "X-Api-Key: 5f4dcc3b5aa765d61d8327deb882cf99",
    ],
}

MISSED = {
    "card": [
        "4111111111111112",  # Luhn
        "1234567812345670",  # Luhn-valid, no issuer starts with 1
        "0000000000000000",
        "3782822463100050",  # an Amex prefix with 16 digits
        "41111111111111110000",  # part of a longer number
        "order 4111111111111",  # 13 digits failing Luhn
    ],
    "iban": [
        "GB82 WEST 1234 5698 7654 33",  # checksum
        "GB82 WEST 1234 5698 7654 3",  # too short for GB
        "GB82WEST12345698765432X",  # runs on
        "XX82 WEST 1234 5698 7654 32",  # no such country
        "GB00 WEST 1234 5698 7654 32",  # check digits out of range
        "tracking JD014600003828391830",
    ],
    "ssn": [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "123-00-4567",
        "123-45-0000",
        "536904399",  # bare nine digits, nothing says SSN
        "123 456 789",  # grouped as a number, not as an SSN
    ],
    "email": ["user@localhost", "@example.com", "a@b.c", "name@123.456", ".a@example.com"],
    "phone": [
        "+999 1234 5678",  # no such country code
        "123-456-7890",  # area codes do not start with 1
        "+1 123 555 2671",
        "+12345",
        "2024-05-01 12:30",
        "01.05.2024 12:30",
        "4155552671",  # ten bare digits: an id as often as a number
        "550e8400-e29b-41d4-a716-446655440000",
    ],
    "aws_access_key": [
        "AKIA1234567890123456",  # 0, 1, 8, 9 are not in its alphabet
        "XAKIAIOSFODNN7EXAMPLE",
        "AKIAIOSFODNN7EXAMPL",
        "AKIAIOSFODNN7EXAMPLEX",
    ],
    "aws_secret_key": [
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLE",  # 37 characters
        "secret_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # not AWS's name for it
    ],
    "gcp_api_key": ["AIza" + "x" * 30, GCP_KEY + "xyz"],
    "azure_key": ["AccountKey=notakey;", "AccountKey=" + "A" * 20],
    "private_key": [
        "-----BEGIN PUBLIC KEY-----\n" + PEM_BODY + "\n-----END PUBLIC KEY-----",
        "the file starts with -----BEGIN PRIVATE KEY-----",
    ],
    "jwt": [
        f"{b64url({'typ': 'JWT'})}.{b64url({'sub': '1'})}.sig",  # no alg
        "eyJhbGciOi.eyJzdWIi.x",  # not JSON
        "eyJ-not-a-token",
        f"{b64url({'alg': 'none'})}.{b64url({'a': 1})[:-1] + '['}.x",  # bad base64
        # A header nested too deep for json.loads (RecursionError).
        base64.urlsafe_b64encode(b'{"alg":' + b"[" * 100_000).decode().rstrip("=")
        + f".{b64url({'a': 1})}.x",
    ],
    "bearer_token": ["Bearer tokens are documented here", "Bearer aaaaaaaaaaaaaaaaaaaa"],
    "secret": [
        "api_key=changeme",  # one kind of character
        "password: hunter2",  # too short
        "version=1.2.3.4.5.6.7.8",  # not a key word
        "https://example.com/a/very/long/path/to/something",
        "token=[redacted:secret]",
    ],
}


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, texts in FOUND.items() for t in texts])
def test_found(kind: str, text: str) -> None:
    assert kind in kinds({"note": text}), text


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, texts in MISSED.items() for t in texts])
def test_near_miss(kind: str, text: str) -> None:
    assert kind not in kinds({"note": text}), text


def test_every_detector_has_examples() -> None:
    assert set(FOUND) == set(MISSED) == set(DETECTORS)


def test_nothing_in_ordinary_payloads() -> None:
    payload = {
        "event_id": "550e8400-e29b-41d4-a716-446655440000",
        "created_at": "2024-05-01T12:30:00.123Z",
        "price": "1234.56",
        "version": "v3.12.4",
        "trace": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "url": "https://shop.example.com/orders/88213?page=2&sort=desc",
        "vin": "1HGCM82633A004352",
        "postal_code": "01304-001",
        "odometer_km": 120345,
        "text": "Leave the parcel at number 12 if nobody answers; thanks!",
        "token_count": 1534,
        "tokenizer": "cl100k_base",
    }
    assert kinds(payload) == []


def test_secret_under_a_key_word() -> None:
    assert kinds({"api_key": "sk_live_51HqLyjWDarjtT1zdp7dc"}) == ["secret"]
    assert kinds({"clientSecret": "d8F3kL9pQ2mN7vX1"}) == ["secret"]
    assert kinds({"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}) == [
        "aws_secret_key"
    ]
    assert kinds({"AccountKey": AZURE_KEY}) == ["azure_key"]
    assert kinds({"access_token": JWT}) == ["jwt"]
    # Near misses: no key word, or nothing secret-looking under one.
    assert kinds({"description": "sk_live_51HqLyjWDarjtT1zdp7dc"}) == []
    assert kinds({"token": "ok"}) == []
    assert kinds({"password": "changeme"}) == []
    assert kinds({"secret": "this is not a secret"}) == []
    assert kinds({"tokenizer": "cl100k_base"}) == []


def test_ssn_under_an_ssn_key() -> None:
    assert kinds({"ssn": "536904399"}) == ["ssn"]
    assert kinds({"employee_ssn": "536 904 399"}) == ["ssn"]
    assert kinds({"SocialSecurityNumber": "536904399"}) == ["ssn"]
    assert kinds({"note": "social security number 536904399"}) == ["ssn"]
    assert kinds({"id": "536904399"}) == []
    assert kinds({"note": "classname 536904399"}) == []


def test_numbers_sent_as_numbers() -> None:
    assert kinds({"card": 4111111111111111}) == ["card"]
    assert kinds({"ssn": 536904399}) == ["ssn"]
    assert kinds({"count": 4111111111111112, "small": 1234}) == []


def test_luhn() -> None:
    assert check.luhn("79927398713")
    assert not check.luhn("79927398710")
    assert check.card("4111111111111111")
    assert not check.card("4111111111111")  # Visa's 13 digits, but not Luhn
    assert not check.card("5555555555554444"[:15])  # Mastercard has 16


@pytest.mark.parametrize(
    "value", ["GB82WEST12345698765432", "gb82west12345698765432", "NO9386011117947"]
)
def test_iban_checksum(value: str) -> None:
    assert check.iban(value)
    assert not check.iban(value[:-1] + str((int(value[-1]) + 1) % 10))
    assert not check.iban(value + "0")


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("078051120", True),
        ("899999999", True),
        ("000123456", False),
        ("666123456", False),
        ("900123456", False),
        ("999123456", False),
        ("123004567", False),
        ("123450000", False),
        ("12345678", False),
    ],
)
def test_ssn_rules(digits: str, valid: bool) -> None:
    assert check.ssn(digits) is valid


def test_phone_plans() -> None:
    assert check.e164("14155552671")
    assert check.e164("442079460958")
    assert not check.e164("11155552671")  # NANP area codes start 2-9
    assert not check.e164("14151552671")  # so do exchanges
    assert not check.e164("9991234567")  # 999 is no country code
    assert not check.e164("4420")  # too short
    assert check.nanp("4155552671")
    assert not check.nanp("4115552671")  # N11 is a service code
