"""Textual-inversion training through main.py (ldm/adapters/ti_training.py, configs/textual-inversion/): the real-size
configs build, and the tiny SD 1.x model trains an embedding for a few steps on a caption folder: the loss falls,
nothing but the vectors changes, and the saved A1111 file reloads and changes the prompt's encoding. The tiny SDXL
model trains its clip_l / clip_g vectors, and its saved file gives the conditioning the trained model computes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.adapters.embeddings import attach_embeddings, read_embedding
from ldm.adapters.ti_training import TextualInversionDiffusion, initial_vectors
from ldm.prompts import encode_prompts
from ldm.util import ConfigError, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "textual-inversion"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")

NAME = "redthing"
STEPS = 40


@pytest.mark.parametrize(("config", "keys"), [("v1", "sd-v1-keys.tsv"), ("v2", "sd-v2-keys.tsv")])
def test_real_size_configs_build_with_only_the_vectors_trainable(config, keys, reference_dir):
    config = load_config(CONFIGS / f"{config}-textual-inversion.yaml", ["model.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    expected = {line.split("\t")[0] for line in (reference_dir / keys).read_text().splitlines()[1:]}
    assert set(model.state_dict()) == expected | {"embedding_vectors"}
    width = model.cond_stage_model.token_embedding.embedding_dim
    assert model.trainable_parameters() == [model.embedding_vectors] and model.embedding_vectors.shape == (1, width)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["embedding_vectors"]


def test_vectors_start_from_the_init_words_tokens_as_in_a1111(tiny_model):
    encoder = tiny_model.cond_stage_model
    ids = encoder.tokenizer.encode("red circle")
    table = encoder.token_embedding.weight
    assert torch.equal(initial_vectors(encoder, "red circle", 1), table[ids[:1]])
    # Four vectors from two tokens: tokens 0, 0, 1, 1 (A1111's i * k // n).
    assert torch.equal(initial_vectors(encoder, "red circle", 4), table[[ids[0], ids[0], ids[1], ids[1]]])
    with pytest.raises(ConfigError, match="has no tokens"):
        initial_vectors(encoder, "", 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.params.use_ema=true", "use_ema: false"),
        ("model.params.num_vectors_per_token=0", "num_vectors_per_token must be 1 to 75"),
        ("model.params.templates=[a photo]", r"every template needs \[name\]"),
        ("model.params.embedding_name=../x", "must be a plain word"),
    ],
)
def test_bad_settings_are_config_errors(override, message, tiny_files):
    config = load_config(tiny_files / "ti.yaml", [override])
    with pytest.raises(ConfigError, match=message):
        instantiate_from_config(config.model, path="model")


# ---------------------------------------------------------------------------------------------------------------------
# A run on the tiny model


@pytest.fixture(scope="module")
def tiny_files(tiny_config, tiny_dir, tmp_path_factory) -> Path:
    """``ti.yaml``: the tiny model as a TextualInversionDiffusion on a caption folder of red images, from the tiny
    model's weights."""
    folder = tmp_path_factory.mktemp("ti")
    images = folder / "images"
    images.mkdir()
    for i, shade in enumerate((200, 220, 240, 255)):
        Image.new("RGB", (32, 32), (shade, 20, 30)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a square")
    model = OmegaConf.to_container(tiny_config.model, resolve=True)
    model["target"] = "ldm.adapters.ti_training.TextualInversionDiffusion"
    model["base_learning_rate"] = 0.05
    model["params"].update(
        ckpt_path=str(tiny_dir / "model.safetensors"), embedding_name=NAME, init_text="blue", use_ema=False,
        num_vectors_per_token=2, templates=["a photo of [name], [filewords]"], first_stage_key="jpg",
        cond_stage_key="txt", cond_stage_trainable=False,
    )  # fmt: skip
    config = {
        "model": model,
        "data": {
            "target": "ldm.data.base.DataModuleFromConfig",
            "params": {
                "batch_size": 4,
                "num_workers": 0,
                "train": {"target": "ldm.data.folder.CaptionFolder", "params": {"root": str(images), "size": 32}},
            },
        },  # fmt: skip
        "lightning": {
            "trainer": {
                "max_steps": STEPS,
                "log_every_n_steps": 1,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "accelerator": "cpu",
            },
            "modelcheckpoint": {"params": {"every_n_train_steps": 20}},
            "callbacks": {"image_logger": {"target": "ldm.callbacks.ImageLogger", "params": {"disabled": True}}},
        },  # fmt: skip
    }
    OmegaConf.save(OmegaConf.create(config), folder / "ti.yaml")
    return folder


def fixed_loss(model: TextualInversionDiffusion, batch: dict) -> float:
    """The diffusion loss of a batch at fixed timesteps and noise: comparable between embeddings."""
    torch.manual_seed(0)
    with torch.no_grad():
        z, c = model.get_input(batch, model.first_stage_key)
        losses = []
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn_like(z)
            timesteps = torch.full((z.shape[0],), t, dtype=torch.long)
            losses.append(model.p_losses(z, model.get_learned_conditioning(c), timesteps, noise)[0])
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def trained(tiny_files, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    assert main.main(["-b", str(tiny_files / "ti.yaml"), "-t", "-l", str(logs), "--seed", "3"]) == 0
    (logdir,) = logs.iterdir()
    return logdir


def test_training_writes_a1111_embeddings_and_changes_nothing_else(trained, tiny_dir, tiny_weights):
    files = sorted(p.name for p in (trained / "embeddings").iterdir())
    assert files == [f"{NAME}-20.pt", f"{NAME}-{STEPS}.pt", f"{NAME}.pt"]
    # A1111's reader is torch.load; its layout holds only plain containers and tensors.
    data = torch.load(trained / "embeddings" / f"{NAME}.pt", weights_only=True)
    assert data["name"] == NAME and data["step"] == STEPS and data["string_to_param"]["*"].shape == (2, 32)
    state = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    unchanged = [k for k, v in tiny_weights.items() if k in state and torch.equal(state[k], v)]
    assert len(unchanged) == len([k for k in tiny_weights if k in state]) > 100
    assert torch.equal(state["embedding_vectors"], data["string_to_param"]["*"])


def test_training_lowers_the_loss_and_the_file_changes_the_output(trained, tiny_files, tiny_model):
    config = load_config(tiny_files / "ti.yaml")
    model = instantiate_from_config(config.model, path="model").eval()
    batch = {
        "jpg": torch.stack([torch.tensor([s / 127.5 - 1, -0.84, -0.76]).expand(32, 32, 3) for s in (200, 255)]),
        "txt": ["a square", "a square"],
    }
    before = fixed_loss(model, batch)
    initial = model.embedding_vectors.detach().clone()
    embedding = read_embedding(trained / "embeddings" / f"{NAME}.pt")
    with torch.no_grad():
        model.embedding_vectors.copy_(embedding.vectors[None])
    after = fixed_loss(model, batch)
    # The tiny model's random UNet listens little to its context: 40 steps take about 4% off (1.353 -> 1.302).
    assert after < 0.98 * before, (before, after)
    assert not torch.allclose(embedding.vectors[None], initial)

    # The saved file, loaded for generation, gives the trained model's own encoding of a prompt with the name.
    prompt = f"a photo of {NAME}, a square"
    plain = encode_prompts(tiny_model, [prompt])[0]
    attach_embeddings(tiny_model, [embedding])
    try:
        with_file = encode_prompts(tiny_model, [prompt])[0]
    finally:
        attach_embeddings(tiny_model, [])
    with torch.no_grad():
        torch.testing.assert_close(with_file, model.get_learned_conditioning([prompt]))
    assert not torch.allclose(with_file, plain)


# ---------------------------------------------------------------------------------------------------------------------
# SDXL


def test_the_sdxl_config_builds_with_vectors_for_both_encoders():
    config = load_config(CONFIGS / "sdxl-textual-inversion.yaml", ["model.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"embedding_vectors.clip_l": (1, 768), "embedding_vectors.clip_g": (1, 1280)}


def test_sdxl_training_steps_lower_the_loss_and_the_file_gives_the_same_conditioning(tmp_path):
    from sdxl_model import IMAGE
    from sdxl_model import tiny_config as sdxl_config

    from ldm.sdxl_conditioning import encode_sdxl_prompts

    config = sdxl_config()
    base_model = config.model
    torch.manual_seed(0)
    base = instantiate_from_config(base_model).eval()
    with torch.no_grad():  # a freshly built UNet ignores its context (zero-initialised attention outputs)
        for param in base.model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    ti_config = OmegaConf.merge(base_model, {"target": "ldm.adapters.ti_training.TextualInversionSDXL", "params": {
        "embedding_name": NAME, "init_text": "blue", "num_vectors_per_token": 2,
        "templates": ["a photo of [name], [filewords]"]}})  # fmt: skip
    model = instantiate_from_config(ti_config)
    model.load_state_dict(base.state_dict(), strict=False)
    model.eval()
    batch = {"jpg": torch.rand(4, IMAGE, IMAGE, 3) * 0.2 + torch.tensor([0.6, -0.8, -0.7]), "txt": ["a square"] * 4}
    initial = {k: v.detach().clone() for k, v in model.embedding_vectors.items()}
    # Steps on one fixed draw of timesteps and noise, through the training path (captions from the templates,
    # encoded with gradients): the random tiny UNet makes the loss over random draws too noisy to compare.
    torch.manual_seed(1)
    z, c = model.get_input(batch, model.first_stage_key)
    t, noise = torch.randint(100, 900, (z.shape[0],)), torch.randn_like(z)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss, _ = model.p_losses(z, model.get_learned_conditioning(c), t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.98 * losses[0], losses
    assert all(not torch.equal(initial[k], v) for k, v in model.embedding_vectors.items())
    assert set(model.state_dict()) - set(base.state_dict()) == {"embedding_vectors.clip_l", "embedding_vectors.clip_g"}

    model.save_embedding(tmp_path / f"{NAME}.safetensors")
    embedding = read_embedding(tmp_path / f"{NAME}.safetensors")
    assert embedding.vectors["clip_l"].shape == (2, 32)
    prompt = f"a photo of {NAME}, a square"
    attach_embeddings(base, [embedding])
    with torch.no_grad():
        cond, _ = encode_sdxl_prompts(base, [prompt], [""], 1, {}, *model.output_size)
        trained = model.get_learned_conditioning([prompt])
    torch.testing.assert_close(cond["c_crossattn"][0], trained["c_crossattn"][0])
    torch.testing.assert_close(cond["c_adm"], trained["c_adm"])
