"""Demo secrets generated on first use into CDME's home, never into the repository or the warehouse."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from services.core.errors import ConfigurationError
from services.core.settings import CdmeSettings

_MIN_PEPPER = 16


def read_or_create_secret(path: Path, *, nbytes: int = 32) -> str:
    """Return the secret stored at `path`, creating it (mode 0600, random) if it does not exist.

    The file is created exclusively, so two processes racing on first use agree on one secret.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    value = secrets.token_hex(nbytes)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def resolve_pepper(settings: CdmeSettings) -> str:
    """The pepper for pseudonymized keys: `CDME_PEPPER`, else the demo pepper under `<home>/secrets/pepper`.

    Raises:
        ConfigurationError: `CDME_PEPPER` is too short or holds characters libpq options cannot carry.
    """
    if settings.pepper is None:
        return read_or_create_secret(settings.home / "secrets" / "pepper")
    value = settings.pepper.get_secret_value()
    # The pepper travels in PGOPTIONS ("-c cdme.pepper=..."), where spaces and backslashes need escaping.
    if len(value) < _MIN_PEPPER or any(c.isspace() or c == "\\" for c in value):
        msg = f"CDME_PEPPER must be at least {_MIN_PEPPER} characters without spaces or backslashes"
        raise ConfigurationError(msg)
    return value
