"""Bearer-token authentication: tokens map to principals with roles.

Tokens come from `CDME_AUTH_TOKENS` (`token=principal:role1,role2;...`, for secrets injected by an
orchestrator) or from a JSON file that stores only SHA-256 digests of tokens:

    {"principals": [{"name": "demo", "roles": ["data_engineer"], "token_sha256": "<hex>"}]}

There is no "authentication off" switch: the demo creates a random token for a `demo` principal on first
run (`ensure_demo_token`), and clients read it from `<home>/auth/token`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigurationError,
    describe_validation_error,
)
from services.core.secrets import read_or_create_secret, write_private_file
from services.core.settings import CdmeSettings

DEMO_PRINCIPAL = "demo"
DEMO_ROLES = ("data_engineer", "auditor")


@dataclass(frozen=True)
class Principal:
    """Who a request acts for, and the roles it holds."""

    name: str
    roles: frozenset[str]

    def require(self, role: str) -> None:
        """Raise unless the principal holds `role`.

        Raises:
            AuthorizationError: The role is missing.
        """
        if role not in self.roles:
            msg = f"principal {self.name!r} lacks role {role!r}"
            raise AuthorizationError(msg)


class _PrincipalEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    roles: list[str] = Field(default_factory=list)
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _TokensFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    principals: list[_PrincipalEntry]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Maps bearer tokens to principals, comparing digests in constant time."""

    def __init__(self, principals: dict[bytes, Principal]) -> None:
        """Build from `{sha256(token): principal}`."""
        self._principals = principals

    @classmethod
    def from_settings(cls, settings: CdmeSettings) -> TokenAuthenticator:
        """Load tokens from `CDME_AUTH_TOKENS` if set, else from the tokens file.

        Raises:
            ConfigurationError: Neither source has a token, or one is malformed.
        """
        if settings.auth_tokens is not None:
            return cls.from_env_value(settings.auth_tokens.get_secret_value())
        return cls.from_file(settings.tokens_file)

    @classmethod
    def from_env_value(cls, value: str) -> TokenAuthenticator:
        """Parse `token=principal:role1,role2;token2=principal2:role`.

        Raises:
            ConfigurationError: An entry is not `token=principal[:roles]`.
        """
        principals: dict[bytes, Principal] = {}
        for number, entry in enumerate(filter(None, (e.strip() for e in value.split(";"))), start=1):
            token, sep, who = entry.partition("=")
            name, _, roles = who.partition(":")
            if not sep or not token.strip() or not name.strip():
                msg = f"CDME_AUTH_TOKENS entry {number} is not token=principal:role1,role2"
                raise ConfigurationError(msg)
            principals[_digest(token.strip())] = Principal(
                name.strip(), frozenset(r.strip() for r in roles.split(",") if r.strip())
            )
        if not principals:
            msg = "CDME_AUTH_TOKENS is set but holds no token"
            raise ConfigurationError(msg)
        return cls(principals)

    @classmethod
    def from_file(cls, path: Path) -> TokenAuthenticator:
        """Load principals and token digests from a JSON file.

        Raises:
            ConfigurationError: The file is missing or malformed.
        """
        try:
            # Bytes, not text: pydantic reports a file that is not UTF-8 as invalid JSON like any other.
            parsed = _TokensFile.model_validate_json(path.read_bytes())
        except FileNotFoundError as e:
            msg = f"{path}: no tokens file; set CDME_AUTH_TOKENS or run `cdme auth token` to create the demo token"
            raise ConfigurationError(msg) from e
        except OSError as e:
            msg = f"{path}: cannot read tokens file: {e.strerror or e}"
            raise ConfigurationError(msg) from e
        except ValidationError as e:
            msg = f"{path}: {describe_validation_error(e)}"
            raise ConfigurationError(msg) from e
        return cls(
            {bytes.fromhex(p.token_sha256): Principal(p.name, frozenset(p.roles)) for p in parsed.principals}
        )

    def principal_named(self, name: str) -> Principal | None:
        """The principal called `name`, for acting on someone's behalf (e.g. `cdme validate --principal`)."""
        return next((p for p in self._principals.values() if p.name == name), None)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header value.

        Raises:
            AuthenticationError: The header is missing, not a bearer token, or the token is unknown.
        """
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            msg = "missing bearer token: send 'Authorization: Bearer <token>'"
            raise AuthenticationError(msg)
        presented = _digest(token.strip())
        found: Principal | None = None
        for digest, principal in self._principals.items():
            # Compare against every digest so the time taken does not reveal which one matched.
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            msg = "unknown bearer token"
            raise AuthenticationError(msg)
        return found


def ensure_demo_token(settings: CdmeSettings) -> str:
    """Return the demo token, creating it on first run and making sure it authenticates.

    The token is kept in `<home>/auth/token` (mode 0600) for clients; the tokens file stores only its digest.
    Other principals in an existing tokens file are kept; the `demo` entry is added or refreshed atomically.

    Raises:
        ConfigurationError: `CDME_AUTH_TOKENS` is set (it replaces the tokens file, so a demo token could not
            authenticate), or the existing tokens file is malformed.
    """
    if settings.auth_tokens is not None:
        msg = "CDME_AUTH_TOKENS is set, so tokens come from it alone; use one of its tokens instead of the demo's"
        raise ConfigurationError(msg)
    token = read_or_create_secret(settings.home / "auth" / "token")
    tokens_file = settings.tokens_file
    demo = _PrincipalEntry(name=DEMO_PRINCIPAL, roles=list(DEMO_ROLES), token_sha256=_digest(token).hex())
    principals: list[_PrincipalEntry] = []
    if tokens_file.exists():
        try:
            principals = _TokensFile.model_validate_json(tokens_file.read_bytes()).principals
        except ValidationError as e:
            msg = f"{tokens_file}: {describe_validation_error(e)}"
            raise ConfigurationError(msg) from e
        if any(p.name == DEMO_PRINCIPAL and p.token_sha256 == demo.token_sha256 for p in principals):
            return token
    entries = [p.model_dump() for p in principals if p.name != DEMO_PRINCIPAL] + [demo.model_dump()]
    write_private_file(tokens_file, json.dumps({"principals": entries}, indent=2) + "\n")
    return token
