"""The four services as local processes: started on free loopback ports, found again by pid, stopped by pid.

Each service runs as `python -m uvicorn services.<name>.app:app` in its own session, with its pid in
`<home>/services/<name>.pid`, its port in `<name>.port` and its log in `<home>/logs/<name>.log`. A service whose
pid is alive and whose `/livez` answers is reused; its port is kept, so the peers' URLs stay valid. Every
service gets every peer's URL and the demo bearer token as its service token.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

from services.core.auth import ensure_demo_token
from services.core.errors import CdmeError, ConfigurationError
from services.core.net import free_port
from services.core.service_process import await_answer, spawn_service
from services.core.settings import CdmeSettings

SERVICES: Final = ("validation", "adjoint", "lineage", "planner")
_URL_SETTINGS: Final = {
    "validation": "CDME_VALIDATION_URL",
    "adjoint": "CDME_ADJOINT_URL",
    "lineage": "CDME_LINEAGE_URL",
    "planner": "CDME_PLANNER_URL",
}


class ServiceStartError(CdmeError):
    """A service process exited or did not answer `/livez` in time."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass(frozen=True)
class ServiceState:
    """Where a service is and whether it runs."""

    name: str
    pid: int | None
    port: int | None
    installed: bool
    alive: bool

    @property
    def url(self) -> str | None:
        """Its base URL, when it has a port."""
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def describe(self) -> str:
        """One line for `status`."""
        if not self.installed:
            return f"{self.name:<11} not installed (no services/{self.name}/app.py in this checkout)"
        if self.alive:
            return f"{self.name:<11} running  pid {self.pid}  {self.url}"
        return f"{self.name:<11} stopped"


def _dir(settings: CdmeSettings) -> Path:
    return settings.home / "services"


def log_path(settings: CdmeSettings, name: str) -> Path:
    """The service's log file."""
    return settings.home / "logs" / f"{name}.log"


def installed(name: str) -> bool:
    """Whether this checkout has the service's app module."""
    try:
        return importlib.util.find_spec(f"services.{name}.app") is not None
    except ModuleNotFoundError:  # not even the service's package
        return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_ours(pid: int, name: str) -> bool:
    # A pid file can outlive its process and the pid be reused: check it is our uvicorn for this service.
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(part == f"services.{name}.app:app" for part in cmdline)


def state(settings: CdmeSettings, name: str) -> ServiceState:
    """The service's state as its pid and port files and the process table say."""
    pid = _read_int(_dir(settings) / f"{name}.pid")
    port = _read_int(_dir(settings) / f"{name}.port")
    alive = pid is not None and _is_ours(pid, name)
    return ServiceState(name, pid if alive else None, port, installed(name), alive)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def service_urls(settings: CdmeSettings) -> dict[str, str]:
    """Each service's URL: the running one's, else the settings'."""
    urls = {
        "validation": settings.validation_url,
        "adjoint": settings.adjoint_url,
        "lineage": settings.lineage_url,
        "planner": settings.planner_url,
    }
    for name in SERVICES:
        current = state(settings, name)
        if current.alive and current.url:
            urls[name] = current.url
    return urls


def start(settings: CdmeSettings, warehouse_url: str, *, timeout: float = 90) -> list[ServiceState]:
    """Start every installed service that is not running (reusing those that are); wait for each `/livez`.

    Args:
        settings: The settings (home, project, pepper, ...), passed on to the services through the environment.
        warehouse_url: The warehouse the services use.
        timeout: Seconds to wait for each service to answer.

    Raises:
        ServiceStartError: A service exited or did not answer; the message names it and its log's last line.
    """
    directory = _dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    try:
        token = (
            settings.service_token.get_secret_value()
            if settings.service_token
            else ensure_demo_token(settings)
        )
    except ConfigurationError as e:
        msg = f"the services need a token to call each other: set CDME_SERVICE_TOKEN ({e})"
        raise ConfigurationError(msg) from e
    states = {name: state(settings, name) for name in SERVICES}
    ports: dict[str, int] = {}
    for name, current in states.items():
        if (current.alive and current.port) or (current.port and _port_free(current.port)):
            ports[name] = current.port
        else:
            ports[name] = free_port()
    # The services share this command's settings, but for the URLs of each other, which are the ones started here.
    env = {k: v for k, v in os.environ.items() if k.startswith("CDME_") and k not in _URL_SETTINGS.values()}
    env |= {
        "CDME_HOME": str(settings.home),
        "CDME_WAREHOUSE_URL": warehouse_url,
        "CDME_SERVICE_TOKEN": token,
        "CDME_PROJECT_DIR": str(settings.project_dir),
        **{_URL_SETTINGS[n]: f"http://127.0.0.1:{p}" for n, p in ports.items()},
    }
    for name, port in ports.items():
        # Kept for services not installed too, so their URLs stay the same once they are.
        (directory / f"{name}.port").write_text(f"{port}\n")
    started: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name in SERVICES:
        if states[name].alive or not states[name].installed:
            continue
        process = spawn_service(
            f"services.{name}.app:app",
            ports[name],
            env,
            log_path(settings, name),
            access_log=False,
            detach=True,
        )
        (directory / f"{name}.pid").write_text(f"{process.pid}\n")
        started.append((name, process))
    for name, process in started:
        _wait_live(settings, name, process, f"http://127.0.0.1:{ports[name]}", timeout)
    return [state(settings, name) for name in SERVICES]


def _wait_live(
    settings: CdmeSettings, name: str, process: subprocess.Popen[bytes], url: str, timeout: float
) -> None:
    failure = await_answer(process, url, "/livez", timeout)
    if failure is not None:
        msg = f"the {name} service {failure}: {_last_line(settings, name)}"
        raise ServiceStartError(msg)


def _last_line(settings: CdmeSettings, name: str) -> str:
    path = log_path(settings, name)
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return f"{lines[-1][:300]} (log: {path})" if lines else f"see {path}"


def stop(settings: CdmeSettings, *, timeout: float = 20) -> list[str]:
    """Stop every running service by its pid (SIGTERM, then SIGKILL after `timeout`); returns what was stopped."""
    stopped: list[str] = []
    for name in reversed(SERVICES):
        current = state(settings, name)
        pid_file = _dir(settings) / f"{name}.pid"
        if current.alive and current.pid is not None:
            process = psutil.Process(current.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                process.kill()
                process.wait(timeout)
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    return stopped
