"""Shared by the benchmarks: a server process on a free port, percentiles, machine facts."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"  # what the benchmarks measured; bench/ holds only the scripts


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# -- server side -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m editserve.cli serve` on a free port, up once GET /health answers 200."""

    def __init__(
        self,
        model_path: str | None,
        api_key: str | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,  # `python -m` imports from here first (before PYTHONPATH)
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop())
            prefix="editserve-bench-", suffix=".log", delete=False
        )
        cmd = [sys.executable, "-m", "editserve.cli", "serve", "--port", str(self.port)]
        if model_path:
            cmd += ["--model", model_path]
        # Benchmarks measure the server, not its per-key edit rate limit.
        env = {**os.environ, "EDITSERVE_EDIT_RATE_PER_MINUTE": "0", **(env or {})}
        if api_key:
            env["EDITSERVE_API_KEY"] = api_key
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"the server did not answer /health in {timeout_s:.0f} s:\n{self.tail()}"
        )

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is not None:
            # It died on its own: its log is the only account of why, and is deleted below.
            code = self.proc.returncode
            print(f"the server had exited ({code}):\n{self.tail()}", file=sys.stderr)
        else:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """A benchmark's JSON (folders made as needed), and where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
