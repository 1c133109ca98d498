"""The built-in detectors: one combined pattern finds candidates, a check keeps the real ones.

Every candidate starts at a character from a small set (digits, ``+ @ - A J B b : =``), and
the combined pattern is an alternation of branches that each start with one literal such
character.  That shape lets the regex engine skip every other character in a tight C loop
(its "charset prefix") and try the branches only where one could start; what a branch
matches is a *candidate*, which the branch's handler validates (checksums, issuer ranges,
number plans, structure, entropy) and turns into spans of text, or rejects.

=============  ===============================================================  ==========
anchor         candidate                                                        check
=============  ===============================================================  ==========
digit          a run of 9+ digits, each pair at most 3 separators apart         card, SSN,
                                                                                phone, IBAN
``+``          8+ digits after a plus sign, separated likewise                  E.164
digit          an IBAN's first check digit after two letters, with its BBAN     mod 97
``@``          an e-mail's domain (the local part is read backwards)            labels, TLD
``-``          ``-----BEGIN ... PRIVATE KEY-----``                              body or END
``A``          ``AKIA``/``ASIA``/... and 16 base32 characters; ``AIza`` and 35  boundaries
``J``          the rest of ``eyJ...`` ``.eyJ...`` ``.sig``                      JWT header
``B`` ``b``    ``Bearer`` and a token of 16+ characters                         entropy
``:`` ``=``    a value of 8+ characters after a key word (``api_key=``, ...)    entropy,
                                                                                key format
=============  ===============================================================  ==========

Separators inside numbers are ASCII whitespace and controls, ``.``, ``-``, ``(`` and ``)``;
the scanner folds Unicode spaces, dashes and invisible characters into these or away first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import accumulate, groupby

from mesh.dlp import validators
from mesh.dlp.keywords import KV_SUFFIXES, mentions_ssn, secret_kind
from mesh.dlp.kinds import (
    AWS_ACCESS_KEY,
    AWS_SECRET_KEY,
    AZURE_KEY,
    BEARER_TOKEN,
    CARD,
    EMAIL,
    GCP_API_KEY,
    IBAN,
    JWT,
    PHONE,
    PRIVATE_KEY,
    SECRET,
    SSN,
)

Span = tuple[str, int, int]
"""What was found: (kind, start, end) in the scanned text."""

_SEP = r"[\x00-\x20\x7f.()\-]"
_DIGITS = re.compile(r"[0-9]+")
_IBAN_AT = re.compile(r"[A-Za-z]{2}[0-9]{2}(?:[\x00-\x20.\-]{0,2}[A-Za-z0-9]){11,30}")
_PEM_END = re.compile(r"-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]+")
_NAME_BEFORE = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]{0,79})[\"' ]{0,2}\Z")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_BASE64URL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
_PEM_BODY = 64
"""Base64 characters after a private key's header that make it a key, not a mention."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler needs besides the text: the kinds asked for, and whether the key
    the text sits under speaks of social security numbers."""

    kinds: frozenset[str]
    ssn_key: bool = False


Handler = Callable[[str, "re.Match[str]", Context], list[Span]]


@dataclass(frozen=True, slots=True)
class Branch:
    """One alternative of the combined pattern: its anchor characters, the pattern after the
    anchor, the kinds it can find, and the handler that checks what it matched.
    ``whole``: the handler looked at all of it, so the search goes on after it even when
    nothing was found (else one character on, where another branch may start).  ``guard``:
    a test that branches of one anchor share, written once before them (so that a digit
    inside a number fails once, not once per branch)."""

    anchors: str
    pattern: str
    kinds: frozenset[str]
    handler: Handler
    whole: bool = False
    guard: str = ""


# ----------------------------------------------------------------------------- numbers


def _numbers(text: str, match: re.Match[str], context: Context) -> list[Span]:
    return number_spans(text, match.start(), match.end(), context)


def number_spans(text: str, start: int, end: int, context: Context) -> list[Span]:
    """Cards, SSNs, phone numbers and all-digit IBANs in the run of digits text[start:end]
    (which may start with ``+``)."""
    kinds = context.kinds
    plus = text[start] == "+"
    if IBAN in kinds and not plus and start >= 2 and text[start - 2 : start].isalpha():
        span = _iban_at(text, start - 2)
        if span is not None:
            return [span]
    if not plus and text[start:end].isdigit():
        return _digits_only(text, start, end, context)
    run = _Run(text, start, end)
    found: list[Span] = []
    if plus:
        if PHONE in kinds:
            _international(run, found, 0, start)
        return found
    if CARD in kinds and len(run.digits) >= 13:
        for i in range(run.count):
            if run.used[i]:
                continue
            # The longest valid window: 4 1 1 1 ... may hold a 13-digit Visa number too.
            longest = None
            for _, j in run.windows(13, 19, i):
                if validators.card(run.digits_of(i, j)):
                    longest = j
            if longest is not None:
                run.take(found, CARD, i, longest)
    if SSN in kinds and run.free >= 9:
        context_says = None
        for i, j in run.windows(9, 9):
            shape = run.shape(i, j)
            if shape == (3, 2, 4) or (len(shape) >= 5 and max(shape) <= 2):
                plausible = True
            else:
                if context_says is None:
                    context_says = context.ssn_key or mentions_ssn(text)
                plausible = context_says
            if plausible and validators.ssn(run.digits_of(i, j)):
                run.take(found, SSN, i, j)
    if PHONE in kinds and run.free >= 10:
        _national(run, found)
    return found


def _digits_only(text: str, start: int, end: int, context: Context) -> list[Span]:
    # What the windows below come to for one group of digits, the usual false candidate
    # (ids, timestamps in ms, tracking numbers): without building them.
    digits, kinds = text[start:end], context.kinds
    if CARD in kinds and 13 <= len(digits) <= 19 and validators.card(digits):
        return [(CARD, start, end)]
    if (
        SSN in kinds
        and len(digits) == 9
        and (context.ssn_key or mentions_ssn(text))
        and validators.ssn(digits)
    ):
        return [(SSN, start, end)]
    if PHONE in kinds and digits.startswith("00") and validators.e164(digits[2:]):
        return [(PHONE, start - 1 if start > 0 and text[start - 1] == "(" else start, end)]
    return []


class _Run:
    """A run of digit groups as written (``4111 1111 ...``), and which groups a finding
    has taken."""

    __slots__ = ("_bounds", "count", "digits", "end", "free", "offsets", "start", "text", "used")

    def __init__(self, text: str, start: int, end: int) -> None:
        self.text, self.start, self.end = text, start, end
        groups = _DIGITS.findall(text, start, end)
        self.count = len(groups)
        self.digits = "".join(groups)
        self.offsets = [0, *accumulate(map(len, groups))]
        self.used = [False] * self.count
        self.free = len(self.digits)
        """Digits no finding has taken yet."""
        self._bounds: list[tuple[int, int]] | None = None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Where each group is in the text (found when first asked: most runs hold nothing)."""
        if self._bounds is None:
            self._bounds = [g.span() for g in _DIGITS.finditer(self.text, self.start, self.end)]
        return self._bounds

    def windows(self, low: int, high: int, first: int | None = None) -> Iterator[tuple[int, int]]:
        """Groups i..j (from any group, or from ``first``) holding ``low`` to ``high`` digits,
        none taken.  Taking a window (``take``) ends the windows over its groups."""
        offsets, used, count = self.offsets, self.used, self.count
        for i in range(count) if first is None else (first,):
            for j in range(i, count):
                if used[j]:
                    break
                size = offsets[j + 1] - offsets[i]
                if size > high:
                    break
                if size >= low:
                    yield i, j
                    if used[j]:
                        break

    def digits_of(self, i: int, j: int) -> str:
        return self.digits[self.offsets[i] : self.offsets[j + 1]]

    def shape(self, i: int, j: int) -> tuple[int, ...]:
        return tuple(self.offsets[k + 1] - self.offsets[k] for k in range(i, j + 1))

    def take(self, found: list[Span], kind: str, i: int, j: int, start: int | None = None) -> None:
        found.append((kind, self.bounds[i][0] if start is None else start, self.bounds[j][1]))
        for k in range(i, j + 1):
            self.used[k] = True
        self.free -= self.offsets[j + 1] - self.offsets[i]


def _international(
    run: _Run, found: list[Span], first: int, start: int | None, skip: int = 0
) -> bool:
    # The longest window from group ``first`` that is an E.164 number (``skip`` digits of an
    # international prefix such as 00 left out), its span from ``start`` (or the group).
    best = None
    for _, j in run.windows(skip + 8, skip + 15, first):
        if validators.e164(run.digits_of(first, j)[skip:]):
            best = j
    if best is None:
        return False
    run.take(found, PHONE, first, best, _opening(run, first) if start is None else start)
    return True


def _national(run: _Run, found: list[Span]) -> None:
    for i in range(run.count):
        if run.used[i]:
            continue
        if run.digits.startswith("00", run.offsets[i]) and _international(run, found, i, None, 2):
            continue
        for _, j in run.windows(10, 11, i):
            digits, shape = run.digits_of(i, j), run.shape(i, j)
            if (
                (shape == (3, 3, 4) and validators.nanp(digits))
                or (shape == (1, 3, 3, 4) and digits[0] == "1" and validators.nanp(digits[1:]))
                or _trunk_form(digits, shape)
            ):
                run.take(found, PHONE, i, j, _opening(run, i))


def _opening(run: _Run, i: int) -> int:
    # Where a phone number starting at group i starts: at its "(" if it has one.
    begin = run.bounds[i][0]
    return begin - 1 if begin > 0 and run.text[begin - 1] == "(" else begin


def _trunk_form(digits: str, shape: tuple[int, ...]) -> bool:
    # A national number dialled with a trunk prefix: 020 7946 0958, 01 23 45 67 89,
    # 030 12345678 (not dates such as 01.05.2024 12 or 2024-05-01 12).
    return (
        digits[0] == "0"
        and digits[1] != "0"
        and 2 <= shape[0] <= 5
        and len(shape) >= 2
        and min(shape) >= 2
        and shape[:3] not in ((2, 2, 4), (4, 2, 2))
    )


def _iban_at(text: str, start: int) -> Span | None:
    # An IBAN starting at ``start``: exactly its country's length in letters and digits,
    # not run on into more of them.
    if start > 0 and text[start - 1].isalnum():
        return None
    match = _IBAN_AT.match(text, start)
    if match is None:
        return None
    length = validators.IBAN_LENGTHS.get(text[start : start + 2].upper())
    if length is None:
        return None
    chars: list[str] = []
    end = start
    for end in range(start, match.end()):
        if text[end].isalnum():
            chars.append(text[end])
            if len(chars) == length:
                break
    end += 1
    if len(chars) < length or (end < len(text) and text[end].isalnum()):
        return None
    return (IBAN, start, end) if validators.iban("".join(chars)) else None


def _iban(text: str, match: re.Match[str], context: Context) -> list[Span]:
    span = _iban_at(text, match.start() - 2)
    return [] if span is None else [span]


# ----------------------------------------------------------------------------- the rest


def _email(text: str, match: re.Match[str], context: Context) -> list[Span]:
    at = match.start()
    start = at
    while start > 0 and at - start < 64 and text[start - 1] in _EMAIL_LOCAL:
        start -= 1
    local = text[start:at]
    labels = text[at + 1 : match.end()].split(".")
    if (
        not local
        or local[0] == "."
        or local[-1] == "."
        or ".." in local
        or not labels[-1].isalpha()
        or len(labels[-1]) < 2
        or any(len(x) > 63 or x[0] == "-" or x[-1] == "-" for x in labels)
    ):
        return []
    return [(EMAIL, start, match.end())]


def _private_key(text: str, match: re.Match[str], context: Context) -> list[Span]:
    end = _PEM_END.search(text, match.end())
    stop = end.start() if end is not None else len(text)
    body = text[match.end() : stop].replace("\\n", "\n").replace("\\r", "\r")
    if end is None and sum(len(r) for r in _BASE64_RUN.findall(body)) < _PEM_BODY:
        return []
    return [(PRIVATE_KEY, match.start(), end.end() if end is not None else len(text))]


def _bounded(text: str, start: int) -> bool:
    # Nothing of a key's alphabet right before it: not the tail of a longer token.
    return start == 0 or text[start - 1] not in _KEY_CHARS


def _aws_key_id(text: str, match: re.Match[str], context: Context) -> list[Span]:
    return [(AWS_ACCESS_KEY, match.start(), match.end())] if _bounded(text, match.start()) else []


def _gcp_key(text: str, match: re.Match[str], context: Context) -> list[Span]:
    return [(GCP_API_KEY, match.start(), match.end())] if _bounded(text, match.start()) else []


def _jwt(text: str, match: re.Match[str], context: Context) -> list[Span]:
    start = match.start() - 2
    if start > 0 and text[start - 1] in _BASE64URL:
        return []
    return [(JWT, start, match.end())] if validators.jwt(text[start : match.end()]) else []


def _bearer(text: str, match: re.Match[str], context: Context) -> list[Span]:
    start = match.start() + len("bearer")
    while text[start].isspace():
        start += 1
    token = text[start : match.end()]
    return [(BEARER_TOKEN, start, match.end())] if validators.random_looking(token) else []


def _key_value(text: str, match: re.Match[str], context: Context) -> list[Span]:
    separator = match.start()
    name = _NAME_BEFORE.search(text, max(0, separator - 82), separator)
    kind = None if name is None else secret_kind(name.group(1))
    if kind is None:
        return []
    start = separator + 1
    while text[start] in " \t\r\n\"'":
        start += 1
    judged = judge_secret(kind, text[start : match.end()], context.kinds)
    return [] if judged is None else [(judged, start, match.end())]


def judge_secret(kind: str, value: str, kinds: frozenset[str]) -> str | None:
    """The kind of secret ``value`` is, found under a key of ``kind`` (``secret_kind``), if
    it is one of ``kinds``; ``None`` if it does not look like a secret (or is not asked for).

    The key's own kind first (an AWS secret key's format, an Azure key's length); then a
    token of a known format (a JWT); then any random-looking value.
    """
    if kind == AWS_SECRET_KEY and AWS_SECRET_KEY in kinds and validators.aws_secret_key(value):
        return AWS_SECRET_KEY
    if kind == AZURE_KEY and AZURE_KEY in kinds and validators.azure_key(value):
        return AZURE_KEY
    if value.startswith("eyJ") and JWT in kinds and validators.jwt(value):
        return JWT
    if SECRET in kinds and not value.startswith("[redacted") and validators.random_looking(value):
        return SECRET
    return None


# ----------------------------------------------------------------------------- the pattern

_DIGIT = "0123456789"
_RUN_START = "(?<![0-9].)"
"""After a digit anchor: the digit starts a run (no digit before it)."""
SECRET_KINDS = frozenset({SECRET, AWS_SECRET_KEY, AZURE_KEY, JWT})
"""What a key word (``api_key``, ``password``) may announce."""
_NAMED = "(?i:" + "|".join(sorted(KV_SUFFIXES)) + ")"
_VALUE = r"[\x00-\x20]{0,3}[\"']?"  # before a value: spaces, a quote
_VALUE_CHAR = r"[A-Za-z0-9\-._~+/=%]"

BRANCHES: tuple[Branch, ...] = (
    Branch(
        _DIGIT,
        rf"(?:{_SEP}{{0,3}}[0-9]){{8,}}",
        frozenset({CARD, SSN, PHONE, IBAN}),
        _numbers,
        whole=True,
        guard=_RUN_START,
    ),
    Branch("+", rf"(?:{_SEP}{{0,3}}[0-9]){{8,}}", frozenset({PHONE}), _numbers, whole=True),
    Branch(
        _DIGIT,
        r"(?<=(?<![A-Za-z0-9])[A-Za-z]{2}[0-9])[0-9](?:[\x00-\x20.\-]{0,2}[A-Za-z0-9]){11,30}",
        frozenset({IBAN}),
        _iban,
        guard=_RUN_START,
    ),
    Branch(
        "@",
        r"(?<=[A-Za-z0-9._%+\-]@)[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+",
        frozenset({EMAIL}),
        _email,
    ),
    Branch(
        "-",
        r"----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----",
        frozenset({PRIVATE_KEY}),
        _private_key,
    ),
    Branch(
        "A",
        r"(?:KIA|SIA|BIA|CCA)[A-Z2-7]{16}(?![A-Za-z0-9])",
        frozenset({AWS_ACCESS_KEY}),
        _aws_key_id,
    ),
    Branch("A", r"Iza[A-Za-z0-9_\-]{35}(?![A-Za-z0-9_\-])", frozenset({GCP_API_KEY}), _gcp_key),
    Branch(
        "J",
        r"(?<=eyJ)[A-Za-z0-9_\-]{2,}\.eyJ[A-Za-z0-9_\-]{2,}\.[A-Za-z0-9_\-]*",
        frozenset({JWT}),
        _jwt,
    ),
    Branch(
        "Bb",
        r"(?<![A-Za-z0-9].)(?i:earer)[\x00-\x20]+[A-Za-z0-9\-._~+/]{16,}=*",
        frozenset({BEARER_TOKEN}),
        _bearer,
    ),
    Branch(
        ":=",
        # What follows first (cheap, and rules out times such as 12:30), then the key word.
        rf"(?={_VALUE}{_VALUE_CHAR}{{8}})"
        rf"(?:(?<={_NAMED}.)|(?<={_NAMED}[\"' ].)|(?<={_NAMED}[\"' ]{{2}}.))"
        rf"{_VALUE}{_VALUE_CHAR}{{8,}}",
        SECRET_KINDS,
        _key_value,
    ),
)


@dataclass(frozen=True, slots=True)
class Prefilter:
    """The combined pattern for some kinds, and each of its branches (by the number of the
    empty group that ends the branch: the match's ``lastindex``)."""

    pattern: re.Pattern[str]
    branches: tuple[Branch | None, ...]

    def spans(self, text: str, context: Context, first: re.Match[str] | None = None) -> list[Span]:
        """Everything the kinds of ``context`` find in ``text``, in order; ``first``: the
        pattern's first match in ``text``, if already searched for."""
        found: list[Span] = []
        search = self.pattern.search
        branches = self.branches
        position = 0
        match = first or search(text)
        while match is not None:
            branch = branches[match.lastindex or 0]
            assert branch is not None
            spans = branch.handler(text, match, context)
            if spans:
                found.extend(spans)
                position = max(match.end(), *(end for _, _, end in spans))
            else:
                position = match.end() if branch.whole else match.start() + 1
            match = search(text, position)
        return found


@cache
def prefilter(kinds: frozenset[str]) -> Prefilter | None:
    """The combined pattern for the built-in ``kinds``, or ``None`` if none has a branch."""
    by_anchor: dict[str, list[Branch]] = {}
    for branch in BRANCHES:
        if branch.kinds & kinds:
            for anchor in branch.anchors:
                by_anchor.setdefault(anchor, []).append(branch)
    if not by_anchor:
        return None
    numbered: list[Branch | None] = [None]
    alternatives = []
    for anchor, branches in by_anchor.items():
        parts = []
        for guard, guarded in groupby(branches, key=lambda b: b.guard):
            inner = []
            for branch in guarded:
                numbered.append(branch)  # in the order of their groups in the pattern
                inner.append(f"{branch.pattern}()")
            parts.append(f"{guard}(?:{'|'.join(inner)})")
        alternatives.append(f"{re.escape(anchor)}(?:{'|'.join(parts)})")
    return Prefilter(re.compile("|".join(alternatives)), tuple(numbered))
