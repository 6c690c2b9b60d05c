"""SDXL LoRA training (``LoraSDXL``, ``configs/lora/sdxl-lora.yaml``): the real-size config trains kohya's 722 UNet
layers; on the tiny SDXL model (tests/sdxl_model.py) 2 steps on a non-square batch of cached latents move the UNet
and CLIP ViT-L branches, and the saved file has kohya's ``lora_unet_*`` / ``lora_te1_*`` names that the project's
LoRA loader reads back into an SDXL model; a kohya folder's size_conditioning gives SDXL each image's sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sdxl_model import tiny_config
from test_captions import write_image
from torch.utils.data import default_collate

from ldm.adapters.lora import LoraMerger, read_lora
from ldm.data.captions import KohyaFolder
from ldm.data.latent_cache import MOMENTS_KEY
from ldm.util import ConfigError, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdxl_config_trains_kohyas_722_unet_layers():
    config = load_config(ROOT / "configs" / "lora" / "sdxl-lora.yaml", ["model.params.ckpt_path=null"])
    assert config.data.params.train.target == "ldm.data.captions.KohyaFolder"
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    # 70 transformer blocks x 10 layers (attn1, attn2: q k v out; ff: 2) + proj_in / proj_out of 11 attentions.
    assert len(model.lora_layers) == 722 and all(n.startswith("lora_unet_") for n in model.lora_layers)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if n.startswith("lora_layers.")
    ]


def lora_sdxl_config(text_encoder: bool = True):
    config = tiny_config().model
    config.target = "ldm.adapters.lora_training.LoraSDXL"
    config.params.lora_config = {"rank": 2, "text_encoder": text_encoder, "save_dtype": "float32", "name": "xl"}
    config.params.cond_stage_config.params.emb_models[0].is_trainable = text_encoder  # CLIP ViT-L
    return config


def test_text_encoder_training_needs_a_trainable_clip_entry():
    config = lora_sdxl_config()
    config.params.cond_stage_config.params.emb_models[0].is_trainable = False
    with pytest.raises(ConfigError, match="is_trainable: true"):
        instantiate_from_config(config)


def test_two_steps_on_cached_non_square_latents_and_the_file_reloads(tmp_path):
    torch.manual_seed(0)
    model = instantiate_from_config(lora_sdxl_config())
    with torch.no_grad():  # a freshly built UNet's zero-initialised output layers would pass no gradient back
        for param in model.model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    names = set(model.lora_layers)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_0_self_attn_") for n in names)
    assert all(n.startswith(("lora_unet_", "lora_te1_")) for n in names)
    # A batch as KohyaFolder gives it with cache_latents: posterior moments of 16 x 32 pixel images, no pixels.
    with torch.no_grad():
        moments = model.encode_first_stage(torch.rand(2, 3, 16, 32) * 2 - 1).parameters
    batch = {MOMENTS_KEY: moments, "txt": ["a red square", "a blue square"]}
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    moved = {n for n, b in model.lora_layers.items() if b.lora_up.weight.abs().sum() > 0}
    # The text encoder's branches got gradients too, but for its last layer: SDXL reads the layer before it (as
    # kohya's SDXL files, which hold lora_te1_..._layers_11 all the same).
    unused = {n for n in names if n.startswith("lora_te1_text_model_encoder_layers_2_")}
    assert len(unused) == 6 and moved == names - unused

    path = model.save_lora(tmp_path / "xl.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        assert {k.split(".")[0] for k in f.keys()} == names
    base = instantiate_from_config(tiny_config().model)
    base.load_state_dict(model.state_dict(), strict=False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merger = LoraMerger(base)
    assert merger.apply([(read_lora(path), 1.0, 1.0)])
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    merger.restore()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_kohya_size_conditioning_reaches_the_sdxl_conditioning(tmp_path):
    write_image(tmp_path / "1_a cat" / "wide.png", (100, 30))  # bucket 48x16 of a 32^2 budget in steps of 16
    folder = KohyaFolder(tmp_path, resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=16,
                         size_conditioning=True)  # fmt: skip
    item = folder[0]
    assert item["jpg"].shape == (16, 48, 3)
    assert item["original_size_as_tuple"].tolist() == [30, 100] and item["target_size_as_tuple"].tolist() == [16, 48]
    left = folder.placements[0].resized[0] - 48
    assert left > 1
    assert item["crop_coords_top_left"].tolist() == [0, left // 2]  # centred
    folder.flip_p = 1.0  # flipped, the crop is measured from the other edge (kohya)
    assert folder[0]["crop_coords_top_left"].tolist() == [0, left - left // 2]
    folder.flip_p = 0.0
    batch = default_collate([item])
    plain = {"jpg": batch["jpg"], "txt": batch["txt"]}
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config().model).eval()
    (_, c), (_, c_plain) = model.get_input(batch, "jpg"), model.get_input(plain, "jpg")
    assert not torch.allclose(c["c_adm"], c_plain["c_adm"])  # the image's own sizes, not the bucket's alone
