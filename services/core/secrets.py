"""Demo secrets generated on first use into CDME's home, never into the repository or the warehouse."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from services.core.errors import ConfigurationError
from services.core.settings import CdmeSettings

_MIN_PEPPER = 16


def read_or_create_secret(path: Path, *, nbytes: int = 32) -> str:
    """Return the secret stored at `path`, creating it (mode 0600, random) if it does not exist.

    The secret is written to a private temporary file first and then hard-linked into place, which fails if
    `path` exists: two processes racing on first use agree on one secret, and neither ever reads a file the
    other has created but not yet written.

    Raises:
        ConfigurationError: `path` exists but is empty (delete it to generate a new secret).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(nbytes)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        os.link(staged, path)
    except FileExistsError:
        existing = path.read_text().strip()
        if not existing:
            msg = f"{path} is empty; delete it to generate a new secret"
            raise ConfigurationError(msg) from None
        return existing
    finally:
        os.unlink(staged)
    return value


def write_private_file(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, readable by its owner only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(staged, path)
    except BaseException:
        os.unlink(staged)
        raise


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
