"""A CDME service as a real process: `uvicorn services.<name>.app:app` on a free loopback port, stopped by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from services.core.settings import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """One service; `start` waits for `/livez`, `stop` terminates it, `kill` sends SIGKILL."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, port: int | None = None, app: str | None = None
    ) -> None:
        self.name = name
        self.app = app or f"services.{name}.app:app"
        self.env = env
        self.log = log_dir / f"{name}.log"
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDME_")} | self.env
        command = [sys.executable, "-m", "uvicorn", self.app]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                msg = f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{self.base_url}/livez", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        msg = f"{self.name} did not answer /livez within {timeout}s:\n{self.log_tail()}"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash."""
        if self.process is None:
            return
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=20)
        self.process = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def client(self, token: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
