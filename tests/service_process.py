"""A CDME service as a real process: `uvicorn services.<service>.app:app` on a free loopback port, stopped by pid.

End-to-end and hardening tests share it, so every service is exercised the way it is deployed: its own process,
real HTTP, a real PostgreSQL database.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest

from services.core.net import free_port
from services.core.service_process import await_answer, spawn_service, stop_process

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ServiceProcess:
    """One service started as `uvicorn <app>` (default `services.<service>.app:app`) with its own `CDME_HOME`.

    The process gets no `CDME_` variable from the test runner's environment: only the warehouse URL, the
    tokens (default: `TOKEN` for principal `tester` with role `data_engineer`), the home directory and `env`.
    """

    def __init__(
        self,
        database_url: str,
        home: Path,
        app: str | None = None,
        tokens: str | None = None,
        *,
        service: str = "validation",
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_name: str = "service.log",
    ) -> None:
        self.app = app or f"services.{service}.app:app"
        self.service = self.app.split(".")[1] if app else service
        self.tokens = tokens or f"{TOKEN}=tester:data_engineer"
        self.database_url = database_url
        self.home = home
        self.env = dict(env or {})
        self.log = home / log_name  # several services sharing one home each get their own log
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30, path: str = "/livez") -> None:
        env = {
            "CDME_WAREHOUSE_URL": self.database_url,
            "CDME_AUTH_TOKENS": self.tokens,
            "CDME_HOME": str(self.home),
            **self.env,
        }
        self.process = spawn_service(self.app, self.port, env, self.log)
        failure = await_answer(self.process, self.base_url, path, timeout)
        if failure is not None:
            self.stop()
            pytest.fail(f"the {self.service} service {failure}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as in a crash: no shutdown hook of the service runs."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def client(self, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
