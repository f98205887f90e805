"""JWT bearer tokens: HS256 with a shared secret, or RS256 with a public key.

Claims: ``sub`` (who), ``exp`` (until when; at most ``BITINGLIP_JWT_MAX_TTL``
after ``iat``, or after now when the token has no ``iat``), ``scope`` (space-separated, or
a list: ``jobs:read``, ``jobs:write``, ``admin``); ``iss`` and ``aud`` are
checked when the settings name them.  Only the configured algorithm is
accepted, so ``alg: none`` and algorithm-confusion tokens fail to decode.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from bitinglip.errors import ConfigError, ForbiddenError, UnauthorizedError
from bitinglip.settings import Settings

SCOPES = ("jobs:read", "jobs:write", "admin")
#: where a development gateway keeps the secret it generated, so that
#: ``bitinglip token`` on the same machine signs with the same one
DEV_SECRET_FILE = Path.home() / ".cache" / "bitinglip" / "dev-jwt-secret"


@dataclass(frozen=True)
class Principal:
    sub: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise ForbiddenError(f"this token lacks the {scope!r} scope")


@dataclass(frozen=True)
class TokenVerifier:
    key: str
    algorithm: str
    issuer: str | None = None
    audience: str | None = None
    #: the longest lifetime a token may claim (None: any)
    max_ttl_s: int | None = None

    def decode(self, header: str | None) -> Principal:
        if not header or not header.lower().startswith("bearer "):
            raise UnauthorizedError("missing bearer token (Authorization: Bearer <jwt>)")
        token = header[7:].strip()
        try:
            claims = jwt.decode(token, self.key, algorithms=[self.algorithm], issuer=self.issuer,
                                audience=self.audience, options={"require": ["exp", "sub"],
                                                                 "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise UnauthorizedError(f"invalid token: {exc}") from None
        self._check_lifetime(claims)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise UnauthorizedError("invalid token: 'sub' must be a non-empty string")
        raw = claims.get("scope", "")
        scopes = raw.split() if isinstance(raw, str) else [s for s in raw if isinstance(s, str)] \
            if isinstance(raw, list) else []
        return Principal(sub, frozenset(scopes))

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        if self.max_ttl_s is None:
            return
        # pyjwt has checked that exp (and iat, if present) are numbers and exp is ahead
        iat = claims.get("iat")
        start, since = (float(iat), "iat") if isinstance(iat, int | float) else (time.time(), "now")
        lifetime = float(claims["exp"]) - start
        if lifetime > self.max_ttl_s:
            raise UnauthorizedError(f"invalid token: it lives {lifetime:.0f}s (exp - {since}); this gateway takes "
                                    f"tokens of at most {self.max_ttl_s}s (BITINGLIP_JWT_MAX_TTL)")


def _dev_secret() -> str:
    if DEV_SECRET_FILE.is_file():
        return DEV_SECRET_FILE.read_text().strip()
    DEV_SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(DEV_SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


def verifier(settings: Settings) -> tuple[TokenVerifier, bool]:
    """The token verifier for these settings, and whether its key was
    generated for development. Production without a key is an error."""
    if settings.jwt_public_key:
        return TokenVerifier(settings.jwt_public_key, "RS256", settings.jwt_issuer, settings.jwt_audience,
                             settings.jwt_max_ttl_s), False
    if settings.jwt_secret:
        return TokenVerifier(settings.jwt_secret, "HS256", settings.jwt_issuer, settings.jwt_audience,
                             settings.jwt_max_ttl_s), False
    if settings.environment == "production":
        raise ConfigError("ENVIRONMENT=production needs BITINGLIP_JWT_SECRET or BITINGLIP_JWT_PUBLIC_KEY")
    return TokenVerifier(_dev_secret(), "HS256", settings.jwt_issuer, settings.jwt_audience,
                         settings.jwt_max_ttl_s), True


def mint(settings: Settings, sub: str, scopes: list[str], ttl_s: int = 3600,
         private_key: str | None = None) -> str:
    """A signed token: RS256 with ``private_key``, else HS256 with the
    configured (or development) secret."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ConfigError(f"unknown scope {', '.join(unknown)}; scopes are {', '.join(SCOPES)}")
    if not 0 < ttl_s <= settings.jwt_max_ttl_s:
        raise ConfigError(f"a token's lifetime must be 1 to {settings.jwt_max_ttl_s} seconds (BITINGLIP_JWT_MAX_TTL); "
                          f"got {ttl_s}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "scope": " ".join(scopes), "iat": now, "exp": now + ttl_s}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if private_key:
        return jwt.encode(claims, private_key, algorithm="RS256")
    if settings.jwt_public_key:
        raise ConfigError("BITINGLIP_JWT_PUBLIC_KEY is set: pass the private key to sign RS256 tokens")
    secret, _ = verifier(settings)
    return jwt.encode(claims, secret.key, algorithm="HS256")
