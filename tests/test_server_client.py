"""The real server (``scripts/serve.py`` in a subprocess, uvicorn on loopback) driven by the real ``webuiapi``
client from PyPI and by plain HTTP; a client that disconnects frees the worker; the command line's checks."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from ldm.server.cli import main
from tests.server_helpers import DEMO_ARGS, DEMO_CKPT
from tests.test_server_api import BAD, FAST

pytestmark = pytest.mark.slow
webuiapi = pytest.importorskip("webuiapi", reason="pip install -r requirements-server-test.txt for the client tests")


@pytest.fixture(scope="module")
def api(demo_server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=demo_server.port, sampler="Euler a", steps=6)


def test_webuiapi_txt2img(api):
    result = api.txt2img(prompt="a red circle on a blue background", seed=5, width=64, height=64, batch_size=2)
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [5, 6] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red circle on a blue background"
    assert result.image.info["parameters"] == result.info["infotexts"][0]


def test_webuiapi_img2img_and_inpainting(api):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    result = api.img2img(images=[init], prompt="a blue square", seed=2, width=64, height=64, denoising_strength=0.6)
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.6
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 8, 40, 40))
    inpainted = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=2, width=64, height=64,
                            mask_blur=0, inpainting_fill=1, inpaint_full_res=False)  # fmt: skip
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(inpainted.image.convert("RGB"))[kept], np.asarray(init)[kept])


def test_webuiapi_lists_and_models(api, demo_server):
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in api.get_samplers()}
    assert "karras" in api.util_get_scheduler_names()
    assert api.util_get_current_model() == api.util_get_model_names()[0]
    assert api.get_options()["sd_model_checkpoint"].startswith("models/ldm/shapes/model.safetensors")


def test_webuiapi_interrupt_keeps_the_image_so_far(api):
    answer = {}
    worker = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt="a star", steps=500, width=64,
                                                                          height=64, seed=1)))  # fmt: skip
    worker.start()
    deadline = time.monotonic() + 60
    while api.get_progress()["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = api.get_progress()
    assert progress["state"]["job"] == "txt2img" and progress["current_image"]
    api.interrupt()
    worker.join(timeout=30)
    assert not worker.is_alive() and len(answer["r"].images) == 1


def test_every_endpoint_over_plain_http(demo_server):
    for path in ("samplers", "schedulers", "sd-models", "options", "progress", "embeddings", "loras", "upscalers",
                 "latent-upscale-modes", "scripts"):  # fmt: skip
        response = demo_server.get(f"/sdapi/v1/{path}")
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    for path in ("interrupt", "skip", "refresh-checkpoints", "refresh-loras", "refresh-embeddings"):
        assert demo_server.post(f"/sdapi/v1/{path}").status_code == 200
    image = demo_server.post("/sdapi/v1/txt2img", json=FAST).json()["images"][0]
    assert demo_server.post("/sdapi/v1/png-info", json={"image": image}).json()["parameters"]["Seed"] == "7"
    assert demo_server.get("/ldm/v1/model").json()["default_width"] == 64
    assert demo_server.get("/openapi.json").json()["info"]["title"] == "ldm"


@pytest.mark.parametrize("change, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_over_plain_http_is_a_4xx_naming_the_field(demo_server, change, field):
    response = demo_server.post("/sdapi/v1/txt2img", json={**FAST, **change})
    assert response.status_code == 422 and response.json()["field"] == field


def test_a_client_that_disconnects_frees_the_worker(demo_server):
    body = json.dumps({**FAST, "steps": 1000}).encode()
    with socket.create_connection(("127.0.0.1", demo_server.port)) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        deadline = time.monotonic() + 30
        while demo_server.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    gone = time.monotonic()
    while demo_server.get("/sdapi/v1/progress").json()["state"]["job"]:
        assert time.monotonic() - gone < 5, "the job kept running after its client left"
        time.sleep(0.05)
    start = time.monotonic()
    assert demo_server.post("/sdapi/v1/txt2img", json=FAST).status_code == 200
    assert time.monotonic() - start < 10


def test_served_images_decode_with_their_infotext(demo_server):
    response = requests.post(f"{demo_server.api}/txt2img", json=FAST, timeout=60)
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.format == "PNG" and "Steps: 6" in image.info["parameters"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--max_queue", "0"], "--max_queue must be at least 1"),
        (["--api-auth", "nopassword"], "USER:PASS"),
        (["--ckpt-dir", "/does/not/exist"], "is not a folder"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    assert main([*DEMO_ARGS, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_taken_port_is_named(capsys):
    if not DEMO_CKPT.exists():
        pytest.skip("the bundled demo model is absent")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([*DEMO_ARGS, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
