"""Load on the HTTP server: ``scripts/serve.py`` in a subprocess, N concurrent clients for a bounded time.

    with ServerProcess(*flags) as server:
        result = run_load(server, clients=4, seconds=30, body={"prompt": "a red circle", "steps": 20})
    print(format_results([result]))

Each client posts txt2img requests back to back and records every answer: 200 (with its latency), 429 (the queue
was full; the client waits ``Retry-After`` as a polite client does), or anything else, and any request that got no
answer at all (a failure of the server). A monitor samples the queue length and the server's resident memory.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
SERVING = re.compile(r"Serving .* on (http://\S+) ")


class ServerProcess:
    """``scripts/serve.py *args --port 0`` in a subprocess; ``url`` once it prints its address (within
    ``timeout`` seconds). Its output is kept in ``output``."""

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

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 60), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}{path}", timeout=kwargs.pop("timeout", 300), **kwargs)

    def rss(self) -> int:
        """The server's resident memory in bytes (Linux's /proc)."""
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


@dataclass
class LoadResult:
    """What ``clients`` clients got in ``seconds``: latencies (s) of the 200s, counts of the other answers, the
    longest queue seen and the server's RSS (bytes) at the start and the end."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    unanswered: int = 0
    max_queued: int = 0
    rss: list[int] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return len(self.latencies) + self.refused + len(self.errors)

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_load(server: ServerProcess, clients: int, seconds: float, body: dict[str, Any]) -> LoadResult:
    """``clients`` threads posting ``body`` to txt2img until ``seconds`` have passed; each waits for its answer."""
    result = LoadResult(clients, seconds)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    result.rss.append(server.rss())

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                response = session.post(f"{server.api}/txt2img", json=body, timeout=300)
            except requests.RequestException as err:
                with lock:
                    result.unanswered += 1
                    result.errors.append(f"no answer: {err}")
                continue
            with lock:
                if response.status_code == 200 and response.json().get("images"):
                    result.latencies.append(time.monotonic() - start)
                elif response.status_code == 429:
                    result.refused += 1
                else:
                    result.errors.append(f"{response.status_code}: {response.text[:200]}")
            if response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After", "1")))

    def monitor() -> None:
        while time.monotonic() < deadline:
            queued = server.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["queued"]
            result.max_queued = max(result.max_queued, queued)
            time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=monitor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.rss.append(server.rss())
    return result


def format_results(results: list[LoadResult]) -> str:
    """A Markdown table of the results, one row per client count."""
    lines = [
        "| clients | requests/s | p50 s | p90 s | p99 s | completed | 429 | errors | max queued | RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mib = " -> ".join(f"{b / 2**20:.0f}" for b in r.rss)
        lines.append(
            f"| {r.clients} | {r.throughput:.2f} | {r.percentile(50):.2f} | {r.percentile(90):.2f} | "
            f"{r.percentile(99):.2f} | {len(r.latencies)} | {r.refused} | {len(r.errors)} | {r.max_queued} | {mib} |"
        )
    return "\n".join(lines)


def summary(results: list[LoadResult]) -> dict[str, Any]:
    """The results as JSON-able numbers."""
    return {
        str(r.clients): {
            "requests_per_s": r.throughput,
            "p50_s": r.percentile(50),
            "p90_s": r.percentile(90),
            "p99_s": r.percentile(99),
            "mean_s": statistics.fmean(r.latencies) if r.latencies else None,
            "completed": len(r.latencies),
            "refused_429": r.refused,
            "errors": r.errors,
            "max_queued": r.max_queued,
            "rss_bytes": r.rss,
        }  # fmt: skip
        for r in results
    }
