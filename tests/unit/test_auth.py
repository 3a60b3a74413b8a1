"""Bearer-token authentication: the env value, the tokens file, headers, roles and the demo token."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from services.core.auth import (
    DEMO_PRINCIPAL,
    DEMO_ROLES,
    Principal,
    TokenAuthenticator,
    ensure_demo_token,
)
from services.core.errors import AuthenticationError, AuthorizationError, ConfigurationError
from services.core.settings import CdmeSettings

MALFORMED_ENTRY = "CDME_AUTH_TOKENS entry {} is not token=principal:role1,role2"
MISSING_BEARER = "missing bearer token: send 'Authorization: Bearer <token>'"


@pytest.fixture(autouse=True)
def _no_cdme_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read CDME_* from the environment; the developer's own must not leak into these tests.
    for name in list(os.environ):
        if name.startswith("CDME_"):
            monkeypatch.delenv(name)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_tokens(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


# --- CDME_AUTH_TOKENS ---------------------------------------------------------------------------------


def test_env_value_maps_each_token_to_its_principal_and_roles() -> None:
    auth = TokenAuthenticator.from_env_value("t1=alice:data_engineer,auditor;t2=bob:auditor")

    assert auth.authenticate("Bearer t1") == Principal("alice", frozenset({"data_engineer", "auditor"}))
    assert auth.authenticate("Bearer t2") == Principal("bob", frozenset({"auditor"}))


def test_env_value_without_roles_gives_a_principal_with_no_roles() -> None:
    auth = TokenAuthenticator.from_env_value("t1=alice")

    assert auth.authenticate("Bearer t1") == Principal("alice", frozenset())


def test_env_value_strips_whitespace_around_tokens_names_and_roles() -> None:
    auth = TokenAuthenticator.from_env_value("  t1 = alice : data_engineer , auditor ,, ;\n t2=bob: ; ")

    assert auth.authenticate("Bearer t1") == Principal("alice", frozenset({"data_engineer", "auditor"}))
    assert auth.authenticate("Bearer t2") == Principal("bob", frozenset())


def test_env_value_ignores_empty_entries_between_separators() -> None:
    auth = TokenAuthenticator.from_env_value(";;t1=alice:r;;")

    assert auth.authenticate("Bearer t1").name == "alice"


def test_env_value_keeps_everything_after_the_first_equals_sign_as_the_principal() -> None:
    auth = TokenAuthenticator.from_env_value("t1=alice=x:r")

    assert auth.authenticate("Bearer t1") == Principal("alice=x", frozenset({"r"}))


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("just-a-token", 1),
        ("=alice:r", 1),
        ("  =alice", 1),
        ("t1=", 1),
        ("t1=:r", 1),
        ("t1=  :r", 1),
        ("t1=alice:r;broken", 2),
        ("t1=alice;t2=bob;t3=", 3),
    ],
)
def test_env_value_rejects_a_malformed_entry_naming_its_number(value: str, number: int) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_env_value(value)

    assert str(excinfo.value) == MALFORMED_ENTRY.format(number)


def test_env_value_error_does_not_echo_the_token() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_env_value("s3cret-token")

    assert "s3cret-token" not in str(excinfo.value)


@pytest.mark.parametrize("value", ["", "   ", ";", " ; ;\t"])
def test_env_value_without_any_token_is_rejected(value: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_env_value(value)

    assert str(excinfo.value) == "CDME_AUTH_TOKENS is set but holds no token"


# --- tokens file --------------------------------------------------------------------------------------


def test_tokens_file_maps_digests_to_principals(tmp_path: Path) -> None:
    path = _write_tokens(
        tmp_path / "tokens.json",
        {
            "principals": [
                {"name": "alice", "roles": ["data_engineer"], "token_sha256": _sha("t1")},
                {"name": "bob", "token_sha256": _sha("t2")},
            ]
        },
    )

    auth = TokenAuthenticator.from_file(path)

    assert auth.authenticate("Bearer t1") == Principal("alice", frozenset({"data_engineer"}))
    assert auth.authenticate("Bearer t2") == Principal("bob", frozenset())
    with pytest.raises(AuthenticationError):
        auth.authenticate(f"Bearer {_sha('t1')}")


def test_missing_tokens_file_names_the_path_and_the_remedy(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value) == (
        f"{path}: no tokens file; set CDME_AUTH_TOKENS or run `cdme auth token` to create the demo token"
    )


def test_tokens_file_that_is_not_json_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{not json")

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    message = str(excinfo.value)
    assert message.startswith(f"{path}: Invalid JSON")
    assert ": : " not in message


def test_tokens_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(b"\xff\xfe\x00garbage")

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value).startswith(f"{path}: Invalid JSON")


def test_tokens_file_path_that_is_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(tmp_path)

    assert str(excinfo.value) == f"{tmp_path}: cannot read tokens file: Is a directory"


def test_tokens_file_of_the_wrong_shape_names_the_path(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "tokens.json", [])

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value) == f"{path}: Input should be an object"


def test_tokens_file_with_an_extra_field_names_the_path_and_the_field(tmp_path: Path) -> None:
    path = _write_tokens(
        tmp_path / "tokens.json",
        {"principals": [{"name": "alice", "token_sha256": _sha("t1"), "token": "t1"}]},
    )

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value) == f"{path}: principals.0.token: Extra inputs are not permitted"


def test_tokens_file_with_an_extra_top_level_field_is_rejected(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "tokens.json", {"principals": [], "version": 2})

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value) == f"{path}: version: Extra inputs are not permitted"


@pytest.mark.parametrize("digest", ["t1", "A" * 64, "0" * 63, "g" * 64])
def test_tokens_file_with_a_bad_digest_is_rejected(tmp_path: Path, digest: str) -> None:
    path = _write_tokens(tmp_path / "tokens.json", {"principals": [{"name": "a", "token_sha256": digest}]})

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value) == (
        f"{path}: principals.0.token_sha256: String should match pattern '^[0-9a-f]{{64}}$'"
    )


def test_tokens_file_with_an_empty_principal_name_is_rejected(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "tokens.json", {"principals": [{"name": "", "token_sha256": _sha("t")}]})

    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_file(path)

    assert str(excinfo.value).startswith(f"{path}: principals.0.name: ")


# --- from_settings ------------------------------------------------------------------------------------


def test_from_settings_prefers_auth_tokens_over_the_file(tmp_path: Path) -> None:
    path = _write_tokens(tmp_path / "tokens.json", {"principals": [{"name": "f", "token_sha256": _sha("t")}]})
    settings = CdmeSettings(home=tmp_path, auth_tokens=SecretStr("t=env:r"), auth_tokens_file=path)

    auth = TokenAuthenticator.from_settings(settings)

    assert auth.authenticate("Bearer t") == Principal("env", frozenset({"r"}))


def test_from_settings_reads_auth_tokens_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDME_AUTH_TOKENS", "t=ops:admin")

    auth = TokenAuthenticator.from_settings(CdmeSettings(home=tmp_path))

    assert auth.authenticate("Bearer t") == Principal("ops", frozenset({"admin"}))


def test_from_settings_reads_the_tokens_file_named_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write_tokens(tmp_path / "t.json", {"principals": [{"name": "f", "token_sha256": _sha("t")}]})
    monkeypatch.setenv("CDME_AUTH_TOKENS_FILE", str(path))

    auth = TokenAuthenticator.from_settings(CdmeSettings(home=tmp_path / "home"))

    assert auth.authenticate("Bearer t").name == "f"


def test_from_settings_without_tokens_reports_the_default_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        TokenAuthenticator.from_settings(CdmeSettings(home=tmp_path))

    assert str(excinfo.value).startswith(f"{tmp_path / 'auth' / 'tokens.json'}: no tokens file;")


# --- authenticate -------------------------------------------------------------------------------------


@pytest.fixture
def auth() -> TokenAuthenticator:
    return TokenAuthenticator.from_env_value("good-token=alice:data_engineer;other=bob:auditor")


@pytest.mark.parametrize(
    "header", ["Bearer good-token", "bearer good-token", "BEARER good-token", "Bearer   good-token  "]
)
def test_authenticate_accepts_a_known_bearer_token(auth: TokenAuthenticator, header: str) -> None:
    assert auth.authenticate(header) == Principal("alice", frozenset({"data_engineer"}))


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Bearer    "])
def test_authenticate_rejects_a_missing_token(auth: TokenAuthenticator, header: str | None) -> None:
    with pytest.raises(AuthenticationError) as excinfo:
        auth.authenticate(header)

    assert str(excinfo.value) == MISSING_BEARER


@pytest.mark.parametrize("header", ["Basic Z29vZC10b2tlbg==", "Token good-token", "good-token", "Bearergood"])
def test_authenticate_rejects_a_scheme_other_than_bearer(auth: TokenAuthenticator, header: str) -> None:
    with pytest.raises(AuthenticationError) as excinfo:
        auth.authenticate(header)

    assert str(excinfo.value) == MISSING_BEARER


@pytest.mark.parametrize("token", ["unknown", "good-token-x", "GOOD-TOKEN", "good"])
def test_authenticate_rejects_an_unknown_token(auth: TokenAuthenticator, token: str) -> None:
    with pytest.raises(AuthenticationError) as excinfo:
        auth.authenticate(f"Bearer {token}")

    assert str(excinfo.value) == "unknown bearer token"


def test_authentication_errors_map_to_401() -> None:
    assert AuthenticationError.http_status == 401
    assert AuthorizationError.http_status == 403


# --- Principal.require --------------------------------------------------------------------------------


def test_require_passes_for_a_held_role() -> None:
    Principal("alice", frozenset({"auditor", "data_engineer"})).require("auditor")


def test_require_raises_authorization_error_naming_principal_and_role() -> None:
    with pytest.raises(AuthorizationError) as excinfo:
        Principal("alice", frozenset({"auditor"})).require("data_engineer")

    assert str(excinfo.value) == "principal 'alice' lacks role 'data_engineer'"


def test_require_raises_for_a_principal_without_roles() -> None:
    with pytest.raises(AuthorizationError):
        Principal("nobody", frozenset()).require("auditor")


# --- ensure_demo_token --------------------------------------------------------------------------------


def test_demo_token_is_written_to_home_with_mode_0600(tmp_path: Path) -> None:
    token = ensure_demo_token(CdmeSettings(home=tmp_path))

    token_path = tmp_path / "auth" / "token"
    assert token_path.read_text().strip() == token
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert len(token) == 64


def test_demo_tokens_file_stores_only_the_digest(tmp_path: Path) -> None:
    token = ensure_demo_token(CdmeSettings(home=tmp_path))

    text = (tmp_path / "auth" / "tokens.json").read_text()
    assert token not in text
    assert json.loads(text) == {
        "principals": [{"name": DEMO_PRINCIPAL, "roles": list(DEMO_ROLES), "token_sha256": _sha(token)}]
    }


def test_demo_token_is_the_same_on_every_call(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path)

    first = ensure_demo_token(settings)
    tokens_file = (tmp_path / "auth" / "tokens.json").read_text()
    second = ensure_demo_token(settings)

    assert first == second
    assert (tmp_path / "auth" / "tokens.json").read_text() == tokens_file


def test_demo_token_authenticates_as_the_demo_principal(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path)
    token = ensure_demo_token(settings)

    principal = TokenAuthenticator.from_settings(settings).authenticate(f"Bearer {token}")

    assert principal == Principal("demo", frozenset({"data_engineer", "auditor"}))
    principal.require("data_engineer")
    principal.require("auditor")


def test_demo_token_joins_an_existing_tokens_file_keeping_its_principals(tmp_path: Path) -> None:
    tokens_file = tmp_path / "auth" / "tokens.json"
    tokens_file.parent.mkdir(parents=True)
    ops = {"name": "ops", "roles": ["admin"], "token_sha256": _sha("t")}
    stale_demo = {"name": "demo", "roles": ["data_engineer"], "token_sha256": _sha("an old demo token")}
    tokens_file.write_text(json.dumps({"principals": [ops, stale_demo]}))
    settings = CdmeSettings(home=tmp_path)

    token = ensure_demo_token(settings)

    auth = TokenAuthenticator.from_settings(settings)
    assert auth.authenticate("Bearer t").name == "ops"
    assert auth.authenticate(f"Bearer {token}").name == "demo"
    with pytest.raises(AuthenticationError):
        auth.authenticate("Bearer an old demo token")
    assert [p["name"] for p in json.loads(tokens_file.read_text())["principals"]] == ["ops", "demo"]
    assert tokens_file.stat().st_mode & 0o777 == 0o600
    unchanged = tokens_file.read_text()
    assert ensure_demo_token(settings) == token
    assert tokens_file.read_text() == unchanged


def test_demo_token_is_refused_when_tokens_come_from_the_environment(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path, auth_tokens=SecretStr("t=ops:admin"))
    with pytest.raises(ConfigurationError, match="CDME_AUTH_TOKENS is set, so tokens come from it alone"):
        ensure_demo_token(settings)
    assert not (tmp_path / "auth").exists()


def test_demo_token_with_a_malformed_tokens_file_is_a_configuration_error(tmp_path: Path) -> None:
    tokens_file = tmp_path / "auth" / "tokens.json"
    tokens_file.parent.mkdir(parents=True)
    tokens_file.write_text("{not json")
    with pytest.raises(ConfigurationError, match=r"tokens\.json: Invalid JSON"):
        ensure_demo_token(CdmeSettings(home=tmp_path))
    assert tokens_file.read_text() == "{not json"


def test_demo_token_writes_the_digest_to_a_configured_tokens_file(tmp_path: Path) -> None:
    tokens_file = tmp_path / "elsewhere" / "principals.json"
    settings = CdmeSettings(home=tmp_path / "home", auth_tokens_file=tokens_file)

    token = ensure_demo_token(settings)

    assert (tmp_path / "home" / "auth" / "token").read_text().strip() == token
    assert not (tmp_path / "home" / "auth" / "tokens.json").exists()
    assert TokenAuthenticator.from_file(tokens_file).authenticate(f"Bearer {token}").name == "demo"


def test_demo_token_is_read_back_from_an_existing_token_file(tmp_path: Path) -> None:
    token_path = tmp_path / "auth" / "token"
    token_path.parent.mkdir(parents=True)
    token_path.write_text("preexisting-token\n")

    assert ensure_demo_token(CdmeSettings(home=tmp_path)) == "preexisting-token"
