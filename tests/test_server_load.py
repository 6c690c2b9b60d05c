"""Load on the real server (the shared demo-model subprocess): concurrent clients for a bounded time get every
request answered, none lost, the queue bound respected (429 beyond it) and the server's memory flat."""

from __future__ import annotations

import pytest

from ldm.benchmark.server_load import run_load

pytestmark = pytest.mark.slow
BODY = {"prompt": "a red circle", "steps": 4, "sampler_name": "Euler", "width": 64, "height": 64, "seed": -1}
QUEUE = 8  # scripts/serve.py's default --max_queue


def test_sixteen_clients_are_all_answered_within_the_queue_bound(demo_server):
    demo_server.post("/sdapi/v1/txt2img", json=BODY)  # warm
    result = run_load(demo_server, clients=16, seconds=8, body=BODY)
    assert result.errors == [] and result.unanswered == 0
    assert len(result.latencies) >= 8 and result.refused > 0  # 16 clients > 1 running + 8 waiting
    assert result.max_queued <= QUEUE
    start, end = result.rss
    assert end - start < 64 << 20, f"RSS grew from {start >> 20} to {end >> 20} MiB"
    after = demo_server.post("/sdapi/v1/txt2img", json=BODY)
    assert after.status_code == 200 and demo_server.get("/sdapi/v1/progress").json()["queued"] == 0


def test_the_benchmark_script_checks_its_flags(capsys):
    from scripts.benchmark_server import main

    assert main(["--clients", "0"]) == 2
    assert "--clients must be at least 1" in capsys.readouterr().err
