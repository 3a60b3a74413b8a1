"""A CDME service as its own process: `uvicorn <app>` on a loopback port, waited for over HTTP, stopped by pid.

`cdme services`, the adjoint benchmark and the tests start services this one way, so each runs as deployed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from services.core.settings import PROJECT_ROOT


def spawn_service(
    app: str,
    port: int,
    settings: Mapping[str, str],
    log: Path,
    *,
    access_log: bool = True,
    detach: bool = False,
) -> subprocess.Popen[bytes]:
    """Start `uvicorn <app>` on 127.0.0.1:`port`, its output appended to `log`.

    Its environment is this process's without any `CDME_` variable, plus `settings`: a service reads exactly the
    settings it is given, never a stray one of whoever started it. `detach` puts it in a session of its own, so it
    outlives the command that started it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDME_")} | dict(settings)
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    if not access_log:
        command.append("--no-access-log")
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=detach,
        )


def await_answer(process: subprocess.Popen[bytes], url: str, path: str, timeout: float) -> str | None:
    """Wait until `url``path` answers 200; None then, else why not (the process exited, or the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return f"did not answer {url}{path} within {timeout:.0f}s"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)
