"""Settings from `CDME_` variables, PostgreSQL URL normalisation, and the demo secrets under CDME's home."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from services.core.errors import ConfigurationError
from services.core.secrets import read_or_create_secret, resolve_pepper
from services.core.settings import PROJECT_ROOT, CdmeSettings, get_settings, normalize_postgres_url

EXPECTED_URL = "expected postgresql://user:password@host:port/db"
PEPPER_RULE = "CDME_PEPPER must be at least 16 characters without spaces or backslashes"


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The developer's own CDME_* variables must not leak in, nor settings cached by another test.
    for name in list(os.environ):
        if name.startswith("CDME_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- normalize_postgres_url ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@db.example:5432/warehouse",
        "postgresql://u:p@db.example:5432/warehouse",
        "postgresql+psycopg2://u:p@db.example:5432/warehouse",
        "postgresql+psycopg://u:p@db.example:5432/warehouse",
        "postgres+asyncpg://u:p@db.example:5432/warehouse",
    ],
)
def test_normalize_postgres_url_uses_the_psycopg3_driver(url: str) -> None:
    assert normalize_postgres_url(url) == "postgresql+psycopg://u:p@db.example:5432/warehouse"


def test_normalize_postgres_url_keeps_the_query_string() -> None:
    url = "postgresql://u@h/db?sslmode=require&application_name=cdme"

    assert normalize_postgres_url(url) == "postgresql+psycopg://u@h/db?sslmode=require&application_name=cdme"


def test_normalize_postgres_url_rejects_mysql() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        normalize_postgres_url("mysql://u:p@h:3306/db")

    assert str(excinfo.value) == f"not a PostgreSQL URL: 'mysql'://…; {EXPECTED_URL}"


@pytest.mark.parametrize("url", ["sqlite:///tmp/x.db", "postgresqlx://h/db", "mysql+postgres://h/db"])
def test_normalize_postgres_url_rejects_other_schemes(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^not a PostgreSQL URL: "):
        normalize_postgres_url(url)


@pytest.mark.parametrize("url", ["", "db.example:5432/warehouse"])
def test_normalize_postgres_url_rejects_a_url_without_a_scheme(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^not a PostgreSQL URL: .*expected postgresql://"):
        normalize_postgres_url(url)


# --- CdmeSettings -------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path)

    assert settings.warehouse_url is None
    assert settings.embedded_port == 0
    assert settings.database == "cdme"
    assert settings.project_dir == PROJECT_ROOT / "dbt_project"
    assert settings.pepper is None
    assert settings.auth_tokens is None
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.http_timeout_s == 30.0
    assert settings.http_retries == 3
    assert settings.lineage_mode is None


def test_home_defaults_to_dot_cdme_in_the_checkout() -> None:
    assert CdmeSettings().home == PROJECT_ROOT / ".cdme"


def test_tokens_file_defaults_to_home_auth_tokens_json(tmp_path: Path) -> None:
    assert CdmeSettings(home=tmp_path).tokens_file == tmp_path / "auth" / "tokens.json"


def test_tokens_file_follows_auth_tokens_file(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path, auth_tokens_file=tmp_path / "mine.json")

    assert settings.tokens_file == tmp_path / "mine.json"


def test_tokens_file_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDME_AUTH_TOKENS_FILE", str(tmp_path / "env.json"))

    assert CdmeSettings(home=tmp_path).tokens_file == tmp_path / "env.json"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql+psycopg2://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("  postgresql://u@h/db \n", "postgresql+psycopg://u@h/db"),
    ],
)
def test_warehouse_url_from_the_environment_is_normalized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("CDME_WAREHOUSE_URL", value)

    assert CdmeSettings(home=tmp_path).warehouse_url == expected


def test_warehouse_url_passed_as_an_argument_is_normalized(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path, warehouse_url="postgres://u@h/db")

    assert settings.warehouse_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_blank_warehouse_url_means_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CDME_WAREHOUSE_URL", value)

    assert CdmeSettings(home=tmp_path).warehouse_url is None


def test_non_postgres_warehouse_url_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a PostgreSQL URL"):
        CdmeSettings(home=tmp_path, warehouse_url="mysql://u@h/db")


def test_environment_values_are_read_under_the_cdme_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CDME_HOME", str(tmp_path))
    monkeypatch.setenv("CDME_HTTP_RETRIES", "5")
    monkeypatch.setenv("CDME_HTTP_TIMEOUT_S", "2.5")
    monkeypatch.setenv("CDME_LOG_FORMAT", "text")
    monkeypatch.setenv("CDME_LINEAGE_MODE", "summary")
    monkeypatch.setenv("CDME_PEPPER", "p" * 16)
    monkeypatch.setenv("HTTP_RETRIES", "9")

    settings = CdmeSettings()

    assert settings.home == tmp_path
    assert settings.http_retries == 5
    assert settings.http_timeout_s == 2.5
    assert settings.log_format == "text"
    assert settings.lineage_mode == "summary"
    assert settings.pepper == SecretStr("p" * 16)


def test_secrets_are_not_shown_in_the_settings_repr(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path, pepper="pepper-value-0123456", auth_tokens="tok=demo:r")

    assert "pepper-value-0123456" not in repr(settings)
    assert "tok=demo" not in repr(settings)


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path)

    with pytest.raises(ValidationError):
        settings.http_retries = 1  # type: ignore[misc]


# --- get_settings -------------------------------------------------------------------------------------


def test_get_settings_reads_the_environment_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDME_HOME", str(tmp_path))

    first = get_settings()
    monkeypatch.setenv("CDME_HOME", str(tmp_path / "other"))

    assert first.home == tmp_path
    assert get_settings() is first


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "CDME_HTTP_RETRIES",
            "abc",
            "invalid setting CDME_HTTP_RETRIES: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "CDME_HTTP_RETRIES",
            "11",
            "invalid setting CDME_HTTP_RETRIES: Input should be less than or equal to 10",
        ),
        ("CDME_HTTP_TIMEOUT_S", "0", "invalid setting CDME_HTTP_TIMEOUT_S: Input should be greater than 0"),
        (
            "CDME_LOG_LEVEL",
            "verbose",
            "invalid setting CDME_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
        ),
        (
            "CDME_EMBEDDED_PORT",
            "70000",
            "invalid setting CDME_EMBEDDED_PORT: Input should be less than or equal to 65535",
        ),
        (
            "CDME_WAREHOUSE_URL",
            "mysql://u:p@h/db",
            f"invalid setting CDME_WAREHOUSE_URL: not a PostgreSQL URL: 'mysql'://…; {EXPECTED_URL}",
        ),
    ],
)
def test_get_settings_turns_an_invalid_value_into_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigurationError) as excinfo:
        get_settings()

    assert str(excinfo.value) == message
    assert str(excinfo.value).startswith("invalid setting CDME_")
    assert isinstance(excinfo.value.__cause__, ValidationError)


def test_get_settings_error_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDME_HTTP_RETRIES", "abc")
    with pytest.raises(ConfigurationError):
        get_settings()

    monkeypatch.setenv("CDME_HTTP_RETRIES", "2")
    monkeypatch.setenv("CDME_HOME", str(tmp_path))

    assert get_settings().http_retries == 2


# --- read_or_create_secret ----------------------------------------------------------------------------


def test_read_or_create_secret_creates_a_private_random_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "secret"

    value = read_or_create_secret(path)

    assert path.read_text() == value + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(value) == 64
    int(value, 16)


def test_read_or_create_secret_returns_the_same_value_afterwards(tmp_path: Path) -> None:
    path = tmp_path / "secret"

    first = read_or_create_secret(path)
    mtime = path.stat().st_mtime_ns

    assert read_or_create_secret(path) == first
    assert read_or_create_secret(path, nbytes=8) == first
    assert path.stat().st_mtime_ns == mtime


def test_read_or_create_secret_leaves_no_temporary_files(tmp_path: Path) -> None:
    read_or_create_secret(tmp_path / "secret")
    read_or_create_secret(tmp_path / "secret")

    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_read_or_create_secret_honours_nbytes(tmp_path: Path) -> None:
    assert len(read_or_create_secret(tmp_path / "short", nbytes=8)) == 16


def test_read_or_create_secret_gives_different_paths_different_values(tmp_path: Path) -> None:
    assert read_or_create_secret(tmp_path / "a") != read_or_create_secret(tmp_path / "b")


def test_read_or_create_secret_reads_an_existing_file_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  operator-provided \n")

    assert read_or_create_secret(path) == "operator-provided"


def test_read_or_create_secret_racing_callers_agree_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    callers = 16
    barrier = threading.Barrier(callers)
    results: list[str] = []

    def call() -> None:
        barrier.wait()
        results.append(read_or_create_secret(path))

    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(call) for _ in range(callers)]:
            future.result()

    assert len(results) == callers
    assert set(results) == {path.read_text().strip()}
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


@pytest.mark.parametrize("content", ["", "\n", "  \n"])
def test_read_or_create_secret_rejects_an_empty_existing_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)

    with pytest.raises(ConfigurationError) as excinfo:
        read_or_create_secret(path)

    assert str(excinfo.value) == f"{path} is empty; delete it to generate a new secret"


# --- resolve_pepper -----------------------------------------------------------------------------------


def test_resolve_pepper_uses_cdme_pepper_when_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDME_PEPPER", "a-valid-pepper-0123")

    assert resolve_pepper(CdmeSettings(home=tmp_path)) == "a-valid-pepper-0123"
    assert not (tmp_path / "secrets").exists()


def test_resolve_pepper_accepts_exactly_sixteen_characters(tmp_path: Path) -> None:
    assert resolve_pepper(CdmeSettings(home=tmp_path, pepper="x" * 16)) == "x" * 16


@pytest.mark.parametrize(
    "pepper", ["", "short", "x" * 15, "has a space-0123456", "tab\tinside-0123456", "newline\n-0123456789"]
)
def test_resolve_pepper_rejects_short_or_whitespace_peppers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pepper: str
) -> None:
    monkeypatch.setenv("CDME_PEPPER", pepper)

    with pytest.raises(ConfigurationError) as excinfo:
        resolve_pepper(CdmeSettings(home=tmp_path))

    assert str(excinfo.value) == PEPPER_RULE
    assert not (tmp_path / "secrets").exists()


def test_resolve_pepper_rejects_backslashes(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        resolve_pepper(CdmeSettings(home=tmp_path, pepper="back\\slash-0123456"))

    assert str(excinfo.value) == PEPPER_RULE


def test_resolve_pepper_error_does_not_echo_the_pepper(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        resolve_pepper(CdmeSettings(home=tmp_path, pepper="leaky secret"))

    assert "leaky" not in str(excinfo.value)


def test_resolve_pepper_without_cdme_pepper_creates_the_demo_pepper(tmp_path: Path) -> None:
    settings = CdmeSettings(home=tmp_path)

    pepper = resolve_pepper(settings)

    path = tmp_path / "secrets" / "pepper"
    assert path.read_text().strip() == pepper
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(pepper) >= 16
    assert resolve_pepper(settings) == pepper


# -- review fixes: URLs that cannot be used, database names, dbt's view of the URL -----------------------------------


def test_a_url_with_a_non_numeric_port_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDME_WAREHOUSE_URL", "postgresql://u:secret@h:notaport/db")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert str(info.value) == (
        "invalid setting CDME_WAREHOUSE_URL: cannot parse the URL's host, port or database; "
        "expected postgresql://user:password@host:port/db"
    )
    assert "secret" not in str(info.value)


def test_a_url_without_a_scheme_is_not_echoed() -> None:
    with pytest.raises(ConfigurationError) as info:
        normalize_postgres_url("u:secret@host/db")
    assert "secret" not in str(info.value)
    assert str(info.value).startswith("not a PostgreSQL URL: a value without a scheme;")


def test_url_schemes_are_case_insensitive() -> None:
    assert normalize_postgres_url("POSTGRESQL://u@h/db") == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize("name", ['cdme"; drop database x; --', "1db", "", "a" * 64])
def test_database_must_be_a_plain_identifier(name: str) -> None:
    with pytest.raises(ValidationError):
        CdmeSettings(database=name)


def test_dbt_sees_the_urls_sslmode() -> None:
    from services.core.warehouse import dbt_connection_env, libpq_url

    env = dbt_connection_env("postgresql://u:pw@db.example:6543/warehouse?sslmode=require")
    assert env == {
        "DBT_HOST": "db.example",
        "DBT_PORT": "6543",
        "DBT_USER": "u",
        "DBT_ENV_SECRET_PASSWORD": "pw",
        "DBT_DATABASE": "warehouse",
        "DBT_SSLMODE": "require",
    }
    assert dbt_connection_env("postgresql://u@h/d")["DBT_SSLMODE"] == "prefer"
    assert libpq_url("postgresql+psycopg://u:pw@h:1/d", "other") == "postgresql://u:pw@h:1/other"


def test_service_client_takes_timeout_and_retries_from_settings(tmp_path: Path) -> None:
    from services.core.http import ServiceClient

    settings = CdmeSettings(home=tmp_path, http_timeout_s=2.5, http_retries=7)
    with ServiceClient.from_settings("http://127.0.0.1:1", settings, token="t") as client:
        assert client._retries == 7
        assert client._client.timeout.read == 2.5
        assert client._client.headers["Authorization"] == "Bearer t"
