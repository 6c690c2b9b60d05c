"""The server as users run it: ``scripts/serve.py`` in a subprocess on a free loopback port, for the client, browser
and load tests (the process itself is :class:`ldm.benchmark.server_load.ServerProcess`)."""

from __future__ import annotations

from pathlib import Path

from ldm.benchmark.server_load import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "models/ldm/shapes/config.yaml"
DEMO_CKPT = ROOT / "models/ldm/shapes/model.safetensors"
DEMO_ARGS = ("--config", str(DEMO_CONFIG), "--ckpt", str(DEMO_CKPT), "--device", "cpu", "--precision", "full")


def start_server(*args: str, timeout: float = 120.0) -> ServerProcess:
    return ServerProcess(*args, timeout=timeout)
