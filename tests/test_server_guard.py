"""What guards the server: HTTP basic auth and tokens, CORS off by default, the body size limit, and the job queue's
order, bound (429), cancellation and interrupt."""

from __future__ import annotations

import base64
import threading
import time

import pytest
import torch

from ldm.models.diffusion.samplers import StopSampling
from ldm.request import RuntimeOptions
from tests.server_helpers import DEMO_CKPT, DEMO_CONFIG

fastapi = pytest.importorskip("fastapi", reason="the server needs fastapi (requirements.txt)")
testclient = pytest.importorskip("fastapi.testclient", reason="FastAPI's TestClient needs httpx")

from ldm.server.app import Guard, create_app  # noqa: E402
from ldm.server.catalog import Catalog, Checkpoint  # noqa: E402
from ldm.server.errors import JobCancelled, QueueFull  # noqa: E402
from ldm.server.jobs import Job, JobQueue  # noqa: E402
from ldm.server.service import Service  # noqa: E402


@pytest.fixture(scope="module")
def service():
    if not DEMO_CKPT.exists():
        pytest.skip(f"the bundled demo model is absent: {DEMO_CKPT}")
    first = Checkpoint(DEMO_CKPT, "demo.safetensors", DEMO_CONFIG)
    return Service(Catalog([], [first]), first, RuntimeOptions(device="cpu", precision="full"))


def guarded(service, **guard):
    return testclient.TestClient(create_app(service, JobQueue(limit=2), Guard(**guard)))


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_and_tokens(service):
    client = guarded(service, users=[("ann", "s3cret"), ("bob", "pw")], tokens=["tok-1"])
    refused = client.get("/sdapi/v1/options")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Basic realm="ldm"'
    assert refused.json()["error"] == "unauthorized"
    for headers in (basic("ann", "wrong"), basic("eve", "s3cret"), {"Authorization": "Bearer tok-2"},
                    {"Authorization": "Basic !!!"}, basic("ann", "s3cret:extra")):  # fmt: skip
        assert client.get("/sdapi/v1/options", headers=headers).status_code == 401
    for headers in (basic("ann", "s3cret"), basic("bob", "pw"), {"Authorization": "Bearer tok-1"}):
        assert client.get("/sdapi/v1/options", headers=headers).status_code == 200
    for path in ("/", "/static/app.js", "/docs", "/openapi.json", "/nowhere"):  # the page and its files too
        assert client.get(path).status_code == 401


def test_without_credentials_anyone_on_loopback_may_call(service):
    assert guarded(service).get("/sdapi/v1/options").status_code == 200


def test_cors_is_off_unless_origins_are_given(service):
    origin = {"Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in guarded(service).get("/sdapi/v1/options", headers=origin).headers
    allowed = guarded(service, cors_origins=["http://elsewhere.example"])
    response = allowed.get("/sdapi/v1/options", headers=origin)
    assert response.headers["access-control-allow-origin"] == "http://elsewhere.example"
    other = allowed.get("/sdapi/v1/options", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_bodies_over_the_limit_are_413(service):
    client = guarded(service, max_body=1 << 20)
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x" * (2 << 20)})
    assert response.status_code == 413 and "MiB limit" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(3):
            yield b" " * (1 << 19)

    streamed = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def blocker(release: threading.Event):
    def run(job: Job) -> str:
        release.wait(10)
        return job.name

    return run


def test_the_queue_serves_in_order_and_refuses_beyond_its_bound():
    queue, release = JobQueue(limit=2), threading.Event()
    first = queue.submit(Job("first", blocker(release)))
    while queue.current is None:
        time.sleep(0.01)
    waiting = [queue.submit(Job(name, lambda job: job.name)) for name in ("second", "third")]
    with pytest.raises(QueueFull, match="2 jobs are waiting"):
        queue.submit(Job("fourth", lambda job: job.name))
    release.set()
    assert [f.result(10) for f in (first, *waiting)] == ["first", "second", "third"]
    queue.close()


def test_a_cancelled_job_is_dropped_or_stopped_at_its_next_step():
    queue, release = JobQueue(limit=4), threading.Event()
    queue.submit(Job("busy", blocker(release)))
    while queue.current is None:
        time.sleep(0.01)
    ran = []
    waiting = Job("gone", lambda job: ran.append(job.name))
    future = queue.submit(waiting)
    queue.cancel(waiting)
    assert future.cancelled() and queue.waiting == 0
    release.set()

    def steps(job: Job) -> int:
        for i in range(1000):
            job.on_step(i, torch.zeros(1, 4, 8, 8))
            time.sleep(0.005)
        return 1000

    running = Job("running", steps, steps=1000)
    future = queue.submit(running)
    while running.step < 5:
        time.sleep(0.01)
    queue.cancel(running)
    with pytest.raises(JobCancelled):
        future.result(10)
    assert running.step < 1000 and ran == []
    queue.close()


def test_interrupt_and_skip_stop_the_sampler_not_the_worker():
    job = Job("txt2img", lambda job: None, count=2, steps=10)
    job.on_step(0, torch.zeros(1, 4, 8, 8))
    assert job.progress == pytest.approx(0.05) and job.preview.shape == (4, 8, 8)
    job.skipped.set()
    with pytest.raises(StopSampling):
        job.on_step(1, torch.zeros(1, 4, 8, 8))
    job.begin_iteration(1)
    assert not job.skipped.is_set() and job.progress == pytest.approx(0.5)
    job.interrupted.set()
    with pytest.raises(StopSampling):
        job.on_step(0, torch.zeros(1, 4, 8, 8))


def test_the_queue_batches_neighbours_with_one_key_up_to_max_batch():
    release, groups = threading.Event(), []

    def run_batch(jobs):
        groups.append([job.name for job in jobs])
        return [job.name for job in jobs]

    queue = JobQueue(limit=8, max_batch=4, run_batch=run_batch)
    queue.submit(Job("busy", blocker(release)))
    while queue.current is None:
        time.sleep(0.01)
    specs = [("a", "k", 2), ("b", "k", 1), ("c", "k", 2), ("d", None, 1), ("e", "k", 1), ("f", "k", 1)]
    futures = [queue.submit(Job(n, lambda job: job.name, batch_key=k, images=i)) for n, k, i in specs]
    release.set()
    assert [f.result(10) for f in futures] == ["a", "b", "c", "d", "e", "f"]  # in order, each its own result
    assert groups == [["a", "b"], ["e", "f"]]  # c would pass max_batch; d has no key and runs alone
    queue.close()
