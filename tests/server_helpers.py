"""The server as users run it: ``scripts/serve.py`` in a subprocess on a free loopback port, for the client, browser
and load tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "models/ldm/shapes/config.yaml"
DEMO_CKPT = ROOT / "models/ldm/shapes/model.safetensors"
DEMO_ARGS = ("--config", str(DEMO_CONFIG), "--ckpt", str(DEMO_CKPT), "--device", "cpu", "--precision", "full")
SERVING = re.compile(r"Serving .* on (http://\S+) ")


class ServerProcess:
    """``scripts/serve.py *args --port 0``; ``url`` is known once it prints its address (within ``timeout`` s)."""

    def __init__(self, *args: str, timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts/serve.py"), *args, "--port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.output: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if match := SERVING.search(line):
                self.url = match.group(1)
                self.port = int(self.url.rsplit(":", 1)[1])
                # Keep reading, so that a chatty server never blocks on a full pipe.
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.output))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def api(self) -> str:
        return f"{self.url}/sdapi/v1"

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}{path}", timeout=kwargs.pop("timeout", 120), **kwargs)

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(*args: str, timeout: float = 120.0) -> ServerProcess:
    return ServerProcess(*args, timeout=timeout)
