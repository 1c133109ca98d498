"""Who is calling: a bearer token of the policy's users (``mesh token issue``), checked on
every request against the tokens file beside the policy (``mesh.policy.TokenStore``).

No token, a malformed header, an unknown or a revoked token: 401, with ``WWW-Authenticate``.
Browsers cannot set headers on a websocket or an ``EventSource``, so ``/ws`` and
``/stream`` also take the token as the ``access_token`` query parameter (RFC 6750 2.3);
the bridge does not log query strings.  In open mode (no policy) there are no tokens: every
caller is anonymous and the gateway, also in open mode, checks no identities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from mesh.bridge.errors import ApiError
from mesh.envelope import H_ON_BEHALF_OF
from mesh.policy import TokenError, TokenStore

REALM = 'Bearer realm="mesh"'


@dataclass(frozen=True)
class Caller:
    """A verified caller: the token principal (a policy user), ``None`` in open mode."""

    principal: str | None
    token: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return self.principal or "anonymous"

    @property
    def headers(self) -> dict[str, str]:
        """What the bridge sends with each message on the caller's behalf."""
        return {H_ON_BEHALF_OF: self.principal} if self.principal else {}


ANONYMOUS = Caller(None)


class Authenticator:
    """Checks bearer tokens against ``tokens`` (``None``: open mode, everyone anonymous)."""

    def __init__(self, tokens: TokenStore | None) -> None:
        self.tokens = tokens

    def caller(self, connection: HTTPConnection, *, query: bool = False) -> Caller:
        """The caller of ``connection``; ``query`` also reads ``?access_token=``."""
        if self.tokens is None:
            return ANONYMOUS
        token = self._token(connection, query)
        return self.verify(token)

    def verify(self, token: str) -> Caller:
        """The caller ``token`` belongs to; 401 for an unknown or revoked one."""
        if self.tokens is None:
            return ANONYMOUS
        try:
            principal = self.tokens.verify(token)
        except TokenError as exc:
            raise ApiError(503, f"cannot check tokens: {exc}") from None
        if principal is None:
            raise _unauthorized("the token is unknown or revoked", invalid=True)
        return Caller(principal, token)

    def still_valid(self, caller: Caller) -> bool:
        """Whether ``caller``'s token still verifies (not revoked since)."""
        if self.tokens is None:
            return True
        try:
            return self.tokens.verify(caller.token) == caller.principal
        except TokenError:
            return False

    @staticmethod
    def _token(connection: HTTPConnection, query: bool) -> str:
        header = connection.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("the Authorization header must be 'Bearer <token>'")
            return token.strip()
        if query and connection.query_params.get("access_token"):
            return connection.query_params["access_token"]
        where = " (or ?access_token=<token>)" if query else ""
        raise _unauthorized(
            f"no token: send Authorization: Bearer <token>{where}; an operator issues one "
            "with: mesh token issue NAME --policy policy.yaml"
        )


def _unauthorized(error: str, *, invalid: bool = False) -> ApiError:
    challenge = f'{REALM}, error="invalid_token"' if invalid else REALM
    return ApiError(401, error, headers={"WWW-Authenticate": challenge})
