"""DreamBooth prior preservation for LoRA training (``configs/lora/v1-lora.yaml`` + ``data-prior-preservation.yaml``):
the configs merge into a LoRA model on a PriorPreservation dataset, and on the tiny SD 1.x model a batch of cached,
non-square instance + class latents gives loss = instance + prior_loss_weight * class, gradients to the LoRA
branches likewise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_captions import write_image

from ldm.data.latent_cache import MOMENTS_KEY, model_encoder
from ldm.data.prior import CLASS_KEY, PriorPreservation
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "configs" / "lora" / "v1-lora.yaml"
PRIOR = ROOT / "configs" / "lora" / "data-prior-preservation.yaml"
BUCKETS = {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16}


def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A wide and a tall instance image in ``1_sks dog``; two square class images."""
    instance = tmp_path / "instance"
    write_image(instance / "1_sks dog" / "wide.png", (60, 15), 1)
    write_image(instance / "1_sks dog" / "tall.png", (15, 60), 2)
    for i in range(2):
        write_image(tmp_path / "class" / f"{i}.png", (32, 32), 10 + i)
    return instance, tmp_path / "class"


def test_the_lora_config_takes_the_prior_preservation_data_section(tmp_path):
    instance, classes = folders(tmp_path)
    config = load_config(
        [LORA, PRIOR],
        [
            f"data.params.train.params.instance.root={instance}",
            f"data.params.train.params.class_data_root={classes}",
            "data.params.train.params.num_class_images=2",
        ],
    )
    assert config.model.target == "ldm.adapters.lora_training.LoraLatentDiffusion"
    assert config.model.params.prior_loss_weight == 1.0 and config.model.params.lora_config.rank == 16
    # The LoRA config's own CaptionFolder section is replaced, not merged into (its size would reach a KohyaFolder).
    assert config.data.params.train.target == "ldm.data.prior.PriorPreservation"
    assert set(config.data.params.train.params) == {"class_data_root", "class_prompt", "num_class_images", "instance"}
    data = instantiate_from_config(config.data)
    data.setup()
    assert isinstance(data.datasets["train"], PriorPreservation) and len(data.datasets["train"]) == 2


@pytest.fixture(scope="module")
def lora_model(tiny_config, tiny_dir):
    config = OmegaConf.merge(tiny_config, {"model": {"target": "ldm.adapters.lora_training.LoraLatentDiffusion",
        "params": {"ckpt_path": str(tiny_dir / "model.safetensors"), "lora_config": {"rank": 4}}}})  # fmt: skip
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():  # up weights off zero, so the down weights get gradients too
        for branch in model.lora_layers.values():
            branch.lora_up.weight.normal_(std=0.1)
    return model


def test_class_images_enter_the_lora_loss_with_prior_loss_weight(lora_model, tmp_path):
    instance, classes = folders(tmp_path)
    data = PriorPreservation({"root": str(instance), "cache_latents": True, **BUCKETS}, classes, "a photo of a dog")
    data.prepare_latents(*model_encoder(lora_model))
    batch = data.collate([data[0]])  # the tall image and a class image cropped to its 16x64 bucket
    assert batch[MOMENTS_KEY].shape == (2, 8, 32, 8) and batch[CLASS_KEY].tolist() == [False, True]
    assert batch["txt"] == ["sks dog", "a photo of a dog"]

    losses, grads, logs = [], [], []
    for weight in (0.0, 1.0, 3.0):
        lora_model.prior_loss_weight = weight
        lora_model.zero_grad()
        torch.manual_seed(0)  # the same posterior draw, timesteps and noise for every weight
        loss, log = lora_model.shared_step(batch)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in lora_model.trainable_parameters()]))
        logs.append(log)
    instance_loss, prior_loss = float(logs[0]["val/loss_instance"]), float(logs[0]["val/loss_prior"])
    assert losses[0] == pytest.approx(instance_loss, rel=1e-5)
    assert losses[1] == pytest.approx(instance_loss + prior_loss, rel=1e-5)
    assert losses[2] == pytest.approx(instance_loss + 3 * prior_loss, rel=1e-5)
    # Gradients are linear in the weight: the class half's share is (g(3) - g(0)) / 3, also g(1) - g(0).
    class_grad = grads[1] - grads[0]
    assert class_grad.abs().sum() > 0
    torch.testing.assert_close(grads[2] - grads[0], 3 * class_grad, rtol=1e-3, atol=1e-6)
    lora_model.zero_grad()
