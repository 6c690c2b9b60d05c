"""DreamBooth prior preservation for LoRA training (``configs/lora/v1-lora.yaml`` + ``data-prior-preservation.yaml``):
the configs merge into a LoRA model on a PriorPreservation dataset, and on the tiny SD 1.x model a batch of cached,
non-square instance + class latents gives loss = instance + prior_loss_weight * class, gradients to the LoRA
branches likewise; missing class images are generated with the model (2 images, 2 steps) into the class folder."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from test_captions import write_image

from ldm.data.class_images import GenerateClassImages, fill_class_folder
from ldm.data.latent_cache import MOMENTS_KEY, model_encoder
from ldm.data.prior import CLASS_KEY, PriorPreservation
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.outputs import image_size, parse_parameters, read_parameters
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
    assert set(config.data.params.train.params) == {
        "class_data_root",
        "class_prompt",
        "num_class_images",
        "instance",
        "generate_class_images",
        "class_sampling",
    }
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


def test_missing_class_images_are_generated_with_the_model_before_training(lora_model, tiny_config, tmp_path):
    instance, _ = folders(tmp_path)
    classes = tmp_path / "generated"  # not there yet
    data = PriorPreservation(
        {"root": str(instance), **BUCKETS}, classes, "a photo of a dog", num_class_images=2,
        class_sampling={"steps": 2, "sampler": "Euler a", "scale": 5.0},
    )  # fmt: skip
    assert data.missing_class_images == 2 and len(data) == 2
    with pytest.raises(UserError, match="lacks 2 class images: they are generated when training starts"):
        data[0]
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(datasets={"train": data}), global_rank=0, world_size=1,
        strategy=SimpleNamespace(barrier=lambda: None),
    )  # fmt: skip
    lora_model.train()
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    GenerateClassImages(tiny_config).on_fit_start(trainer, lora_model)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random numbers are left alone
    assert lora_model.training

    files = sorted(p.name for p in classes.iterdir())
    assert files == ["class-00000.png", "class-00001.png"]
    for seed, name in enumerate(files):
        assert image_size(classes / name) == (32, 32)  # the instance resolution
        fields = parse_parameters(read_parameters(classes / name))
        assert fields["Prompt"] == "a photo of a dog" and fields["Seed"] == str(seed)
        assert fields["Steps"] == "2" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "5.0"
    assert data.missing_class_images == 0
    mine, theirs = data[1]
    assert theirs["txt"] == "a photo of a dog" and theirs["jpg"].shape == mine["jpg"].shape

    # A second run finds the folder full; a smaller set adds only what is missing, under the next free names.
    assert PriorPreservation({"root": str(instance), **BUCKETS}, classes, "dog", num_class_images=2).classes
    more = PriorPreservation({"root": str(instance), **BUCKETS}, classes, "a photo of a dog", num_class_images=3,
                             class_sampling={"steps": 2})  # fmt: skip
    geometry = LatentGeometry.from_config(tiny_config)
    assert fill_class_folder(more, lora_model, geometry) == 1 and (classes / "class-00002.png").is_file()
    assert len(more.classes.records) == 3


def test_generation_can_be_turned_off(tmp_path):
    instance, classes = folders(tmp_path)
    with pytest.raises(UserError, match="has 2 images but num_class_images is 5; set generate_class_images: true"):
        PriorPreservation({"root": str(instance), **BUCKETS}, classes, "dog", 5, generate_class_images=False)
