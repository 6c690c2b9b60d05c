"""LoRA training through main.py on the tiny SD 1.x model: only the branches train, the saved kohya file reloads."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from ldm.adapters.lora import LoraMerger, read_lora
from ldm.checkpoint import load_model_from_config
from ldm.util import ConfigError, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")


def caption_folder(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[..., i % 3] = 220
        pixels[8:24, 8:24] = rng.integers(0, 255, (16, 16, 3))
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {colour} square")
    return root


def lora_run_config(tiny_config, tiny_dir: Path, data: Path, tmp_path: Path) -> Path:
    config = OmegaConf.merge(
        tiny_config,
        {
            "model": {
                "base_learning_rate": 1.0e-2,
                "target": "ldm.adapters.lora_training.LoraLatentDiffusion",
                "params": {
                    "ckpt_path": str(tiny_dir / "model.safetensors"),
                    "lora_config": {"rank": 4, "alpha": 2, "name": "tiny", "save_dtype": "float32"},
                },
            },
            "data": {
                "target": "ldm.data.base.DataModuleFromConfig",
                "params": {
                    "batch_size": 4,
                    "num_workers": 0,
                    "train": {
                        "target": "ldm.data.folder.CaptionFolder",
                        "params": {"root": str(data), "size": 16, "flip_p": 0.0},
                    },
                },
            },
            "lightning": {
                "trainer": {
                    "max_steps": 12,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "log_every_n_steps": 1,
                },
                "modelcheckpoint": {"params": {"every_n_train_steps": 6}},
                "callbacks": {
                    "image_logger": {
                        "target": "ldm.callbacks.ImageLogger",
                        "params": {"batch_frequency": 1000, "disabled": True},
                    }
                },
            },
        },
    )
    path = tmp_path / "tiny-lora.yaml"
    OmegaConf.save(config, path)
    return path


def fixed_loss(model, data: Path, draws: int = 8) -> float:
    """The mean loss on the training images over fixed timesteps and noise (the same draws for every model)."""
    images = [np.asarray(Image.open(data / f"{i}.png").resize((16, 16)), np.float32) / 127.5 - 1 for i in range(4)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    captions = [(data / f"{i}.txt").read_text() for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(x))
        c = model.get_learned_conditioning(captions)
        total = 0.0
        for _ in range(draws):
            t = torch.randint(0, model.num_timesteps, (4,), generator=gen)
            noise = torch.randn(z.shape, generator=gen)
            total += model.p_losses(z, c, t, noise=noise)[0].item()
    return total / draws


def test_training_lowers_the_loss_and_the_saved_file_reloads(tiny_config, tiny_dir, tmp_path):
    data = caption_folder(tmp_path / "data")
    config = lora_run_config(tiny_config, tiny_dir, data, tmp_path)
    assert main.main(["-b", str(config), "-t", "-l", str(tmp_path / "logs"), "--seed", "1"]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    saved = run / "lora" / "tiny.safetensors"
    assert saved.is_file() and (run / "lora" / "tiny-step000006.safetensors").is_file()
    with safe_open(str(saved), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
    # kohya's names for the transformer layers: 2 down, 1 mid, 3 up blocks, 12 layers each (proj_in, proj_out, 8 in
    # attention, 2 in the feed-forward)
    modules = {k.split(".")[0] for k in keys}
    assert len(modules) == 6 * 12 and all(k.startswith("lora_unet_") for k in modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules

    model = load_model_from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu")
    base = fixed_loss(model, data)
    LoraMerger(model).apply([(read_lora(saved), 1.0, 1.0)])
    trained = fixed_loss(model, data)
    print(f"fixed-draw loss: base {base:.4f}, with the trained LoRA {trained:.4f}")
    assert trained < 0.9 * base, (base, trained)


def test_only_the_branches_train_and_they_start_at_zero(tiny_config, tiny_dir, tmp_path):
    config = load_config(lora_run_config(tiny_config, tiny_dir, caption_folder(tmp_path / "d"), tmp_path))
    model = instantiate_from_config(config.model)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.lora_layers.parameters()}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("lora_layers."))
    assert all(torch.equal(b.lora_up.weight, torch.zeros_like(b.lora_up.weight)) for b in model.lora_layers.values())


def test_text_encoder_training_needs_a_trainable_cond_stage(tiny_config, tiny_dir, tmp_path):
    config = load_config(lora_run_config(tiny_config, tiny_dir, caption_folder(tmp_path / "d"), tmp_path))
    config.model.params.lora_config.text_encoder = True
    with pytest.raises(ConfigError, match="cond_stage_trainable"):
        instantiate_from_config(config.model)
    config.model.params.cond_stage_trainable = True
    model = instantiate_from_config(config.model)
    names = set(model.lora_layers)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any(n.startswith("lora_te1_") for n in names)


def test_the_sd1_config_trains_kohyas_192_unet_layers(reference_dir):
    config = load_config(ROOT / "configs" / "lora" / "v1-lora.yaml", ["model.params.ckpt_path=null"])
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    assert len(model.lora_layers) == 192  # the module count of a kohya SD 1.5 UNet LoRA
    expected = {line.split("\t")[0] for line in (reference_dir / "sd-v1-keys.tsv").read_text().splitlines()[1:]}
    assert {k for k in model.state_dict() if not k.startswith("lora_layers.")} == expected
