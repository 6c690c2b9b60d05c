"""The server's models by name: listing and switching checkpoints (options, override_settings), embeddings and
LoRAs from the configured folders, and requests that name paths instead of names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.request import RuntimeOptions
from tests.server_helpers import DEMO_CKPT, DEMO_CONFIG

fastapi = pytest.importorskip("fastapi", reason="the server needs fastapi (requirements.txt)")
testclient = pytest.importorskip("fastapi.testclient", reason="FastAPI's TestClient needs httpx")
pytestmark = pytest.mark.skipif(not DEMO_CKPT.exists(), reason=f"the bundled demo model is absent: {DEMO_CKPT}")

from ldm.server.app import create_app  # noqa: E402
from ldm.server.catalog import Catalog, Checkpoint  # noqa: E402
from ldm.server.jobs import JobQueue  # noqa: E402
from ldm.server.service import Service  # noqa: E402

FAST = {"prompt": "a red circle", "steps": 4, "sampler_name": "Euler", "seed": 3, "width": 64, "height": 64}
OUT = "model.diffusion_model.out.2.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A checkpoint folder with a second model (the demo's weights, its UNet's last layer halved, its config
    beside it as A1111 keeps them), a LoRA folder and an embeddings folder."""
    root = tmp_path_factory.mktemp("server")
    (root / "ckpts/sub").mkdir(parents=True)
    weights = load_file(str(DEMO_CKPT))
    weights[OUT] = weights[OUT] * 0.5
    save_file(weights, str(root / "ckpts/sub/halved.safetensors"))
    shutil.copy(DEMO_CONFIG, root / "ckpts/sub/halved.yaml")
    (root / "ckpts/.hidden").mkdir()
    save_file(weights, str(root / "ckpts/.hidden/secret.safetensors"))
    (root / "loras").mkdir()
    g = torch.Generator().manual_seed(0)
    lora = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 64, generator=g),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(64, 2, generator=g),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
    }
    save_file(lora, str(root / "loras/bold.safetensors"), metadata={"ss_network_dim": "2"})
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=g)}, str(root / "embeddings/shapey.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, str(root / "embeddings/too-wide.safetensors"))
    return root


@pytest.fixture(scope="module")
def client(folders):
    first = Checkpoint(DEMO_CKPT, "demo.safetensors", DEMO_CONFIG)
    service = Service(
        Catalog([folders / "ckpts"], [first]), first, RuntimeOptions(device="cpu", precision="full"),
        lora_dir=folders / "loras", embeddings_dir=folders / "embeddings", outdir=folders / "out",
    )  # fmt: skip
    queue = JobQueue(limit=4)
    with testclient.TestClient(create_app(service, queue)) as client:
        yield client
    queue.close()


def image_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_models_are_listed_by_name_without_hidden_folders(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["demo", "sub_halved"]
    assert models[0]["title"].startswith("demo.safetensors [") and models[0]["hash"]
    assert models[1]["title"] == "sub/halved.safetensors" and models[1]["hash"] is None  # not loaded yet


def test_switching_checkpoints_by_title_and_back(client):
    before = image_of(client.post("/sdapi/v1/txt2img", json=FAST))
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/halved.safetensors"}).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("sub/halved.safetensors [")
    switched = client.post("/sdapi/v1/txt2img", json=FAST)
    assert image_of(switched) != before
    assert "Model: halved" in json.loads(switched.json()["info"])["infotexts"][0]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo"}).status_code == 200
    assert image_of(client.post("/sdapi/v1/txt2img", json=FAST)) == before


def test_override_settings_switch_for_one_request_and_restore(client):
    before = image_of(client.post("/sdapi/v1/txt2img", json=FAST))
    overridden = {**FAST, "override_settings": {"sd_model_checkpoint": "sub_halved", "CLIP_stop_at_last_layers": 2}}
    response = client.post("/sdapi/v1/txt2img", json=overridden)
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Model: halved" in infotext and "Clip skip: 2" in infotext
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("demo.safetensors")
    assert image_of(client.post("/sdapi/v1/txt2img", json=FAST)) == before


def test_options_take_a1111_names_and_refuse_others(client):
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    infotext = json.loads(client.post("/sdapi/v1/txt2img", json=FAST).json()["info"])["infotexts"][0]
    assert "Clip skip: 2" in infotext
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    for bad, field in [({"CLIP_stop_at_last_layers": 0}, "CLIP_stop_at_last_layers"), ({"outdir_samples": "/"},
                       "outdir_samples"), ({"sd_checkpoint_hash": "x"}, "sd_checkpoint_hash")]:  # fmt: skip
        response = client.post("/sdapi/v1/options", json=bad)
        assert response.status_code == 422 and response.json()["field"] == field


@pytest.mark.parametrize(
    "name", ["../ckpts/sub/halved.safetensors", str(DEMO_CKPT), "/etc/passwd", ".hidden/secret.safetensors"]
)
def test_no_request_opens_a_path(client, name):
    response = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
    assert response.status_code == 422 and "no checkpoint" in response.json()["detail"]
    bad_lora = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": f"a red circle <lora:{name}:1>"})
    assert bad_lora.status_code == 422


def test_loras_are_listed_and_used_by_name(client):
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "bold", "alias": "bold", "path": str(client.app.state.service.lora_dir / "bold.safetensors"),
         "metadata": {"ss_network_dim": "2"}}
    ]  # fmt: skip
    plain = client.post("/sdapi/v1/txt2img", json=FAST)
    tagged = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a red circle <lora:bold:1>"})
    assert image_of(tagged) != image_of(plain)
    assert "Lora hashes" in json.loads(tagged.json()["info"])["infotexts"][0]
    missing = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a red circle <lora:absent:1>"})
    assert missing.status_code == 422 and "bold.safetensors" in missing.json()["detail"]


def test_embeddings_are_listed_loaded_and_skipped(client):
    listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"] == {
        "shapey": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64, "vectors": 2}
    }
    assert list(listing["skipped"]) == ["too-wide"] and listing["skipped"]["too-wide"]["shape"] == 768
    response = client.post("/sdapi/v1/txt2img", json={**FAST, "prompt": "a shapey circle"})
    assert "TI hashes" in json.loads(response.json()["info"])["infotexts"][0]
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
