"""main.py trains each CompVis model kind at toy size on the CPU, from the dataset classes the originals' configs
name, over tiny fake copies of their data: VQ and KL autoencoders, class-conditional, unconditional and
super-resolution (``concat``) LDMs, and the x4 upscaler. Each run is a few steps; its last checkpoint must load
strictly into the model built from the config the run saved.

In-process tests of the same models' training steps are in test_training_models.py, test_vq.py and
test_upscale.py; the main.py plumbing (logdirs, resume, signals) is in test_main.py.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_datasets import imagenet_split, lsun_copy
from test_main import QUIET, checkpoint, main, metric_rows, only_logdir
from test_training_models import TINY_VAE
from test_upscale import tiny_config as tiny_upscaler
from test_vq import IDENTITY, TINY_DDCONFIG, VQ_LOSS, tiny_vq_ldm_config

from ldm.checkpoint import load_model_from_config
from ldm.util import load_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*(perceptual_weights|num_workers|LeafSpec|eval mode|val_dataloader).*"),
]

UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
CLASSES = {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"embed_dim": 32, "n_classes": 4}}
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    imagenet_split(root / "train", per_class=2)  # 3 classes, 6 images of 40x30
    return root


def imagenet_train(root: Path, random_crop: bool = True) -> dict:
    """cin-ldm-vq-f8.yaml's train data, at 16 px on the fake copy."""
    config = {"size": 16, "ImageNetTrain": {"random_crop": random_crop}}
    return {"target": "ldm.data.imagenet.ImageNetTrain", "params": {"data_root": str(root), "config": config}}


def data_section(train: dict, batch_size: int = 2) -> dict:
    return {
        "target": "main.DataModuleFromConfig",  # the originals' name for it
        "params": {"batch_size": batch_size, "num_workers": 0, "wrap": False, "train": train},
    }


def run(tmp_path: Path, name: str, model: dict, data: dict, steps: int, *overrides: str) -> tuple[Path, dict]:
    """Train ``model`` on ``data`` for ``steps`` steps through main.py; the logdir and its last checkpoint."""
    config = {
        "model": model,
        "data": data,
        "lightning": {"trainer": {"max_steps": steps, "accelerator": "cpu", "num_sanity_val_steps": 0}},
    }
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(config), path)
    logs = tmp_path / "logs"
    assert main.main(["-b", str(path), "-t", "--scale_lr", "false", "-l", str(logs), *QUIET, *overrides]) == 0
    logdir = only_logdir(logs)
    state = checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == steps
    # The run's own saved config rebuilds the model, and the checkpoint loads into it strictly.
    saved = load_config(next((logdir / "configs").glob("*-project.yaml")))
    reloaded = load_model_from_config(saved, logdir / "checkpoints" / "last.ckpt", device="cpu")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state["state_dict"][key]), key
    return logdir, state


def logged(logdir: Path, key: str) -> list[float]:
    return [float(row[key]) for row in metric_rows(logdir) if row.get(key)]


def diffusion_losses(logdir: Path, steps: int) -> list[float]:
    """The per-step simple losses of a diffusion run, checked to be one a step and finite."""
    losses = logged(logdir, "train/loss_simple_step")
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    return losses


def falls(values: list[float]) -> bool:
    """Whether the last third of ``values`` averages below the first third."""
    third = max(1, len(values) // 3)
    return len(values) >= 3 and sum(values[-third:]) / third < sum(values[:third]) / third


def test_vq_autoencoder_with_the_vqgan_loss(tmp_path, imagenet):
    model = {
        "base_learning_rate": 2e-3,
        "target": "ldm.models.autoencoder.VQModel",
        "params": {
            "embed_dim": 3,
            "n_embed": 32,
            "ddconfig": TINY_DDCONFIG,
            "lossconfig": {
                "target": VQ_LOSS,  # taming's name, as the originals' configs give it
                # The GAN term starts after the run (disc_factor 0), so the reconstruction loss is free to fall;
                # both optimizers step all the same.
                "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 100, "disc_num_layers": 2},
            },
        },
    }
    # One fixed batch of all 6 images (centre crops), so that the reconstruction loss can only fall.
    train = imagenet_train(imagenet, random_crop=False)
    logdir, state = run(tmp_path, "vq", model, data_section(train, batch_size=6), 12, NO_IMAGES)
    assert len(state["optimizer_states"]) == 2 and any(k.startswith("loss.discriminator.") for k in state["state_dict"])
    assert falls(logged(logdir, "train/rec_loss"))


def test_kl_autoencoder_on_imagenet_sr_images(tmp_path, imagenet):
    model = {
        "base_learning_rate": 2e-3,
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "ddconfig": TINY_VAE,
            "lossconfig": {
                "target": "ldm.modules.losses.LPIPSWithDiscriminator",
                "params": {"disc_start": 100, "kl_weight": 1e-6, "disc_weight": 0.5, "disc_num_layers": 2},
            },
        },
    }
    # autoencoder_kl_32x32x4.yaml's data: the high-resolution half of ImageNetSR pairs.
    train = {
        "target": "ldm.data.imagenet.ImageNetSRTrain",
        "params": {
            "data_root": str(imagenet),
            "size": 16,
            "degradation": "pil_nearest",
            "min_crop_f": 1.0,  # whole centre squares: one fixed batch
            "random_crop": False,
        },
    }
    logdir, state = run(tmp_path, "kl", model, data_section(train, batch_size=6), 12, NO_IMAGES)
    assert len(state["optimizer_states"]) == 2
    assert falls(logged(logdir, "train/rec_loss"))


def vq_ldm(**params) -> dict:
    """test_vq's tiny LDM on a VQ first stage (f = 2, 16 px images, 8x8x3 latents), with ``params`` on top."""
    model = copy.deepcopy(tiny_vq_ldm_config())
    model["params"].update(params)
    return {"base_learning_rate": 1e-3, **model}


def test_class_conditional_ldm_on_imagenet(tmp_path, imagenet):
    model = vq_ldm(
        cond_stage_config={**CLASSES, "params": {**CLASSES["params"], "key": "class_label"}},
        cond_stage_key="class_label",
        cond_stage_trainable=True,
        conditioning_key="crossattn",
    )
    model["params"]["unet_config"]["params"].update(
        use_spatial_transformer=True, context_dim=32, attention_resolutions=[1], transformer_depth=1
    )
    train = imagenet_train(imagenet)
    logdir, state = run(tmp_path, "cin", model, data_section(train, batch_size=3), 4, NO_IMAGES)
    assert diffusion_losses(logdir, 4)
    assert state["state_dict"]["cond_stage_model.embedding.weight"].shape == (4, 32)


def test_unconditional_ldm_on_lsun(tmp_path):
    lsun_copy(tmp_path / "lsun")
    unet = {"target": UNET, "params": {**tiny_vq_ldm_config()["params"]["unet_config"]["params"]}}
    unet["params"].update(in_channels=4, out_channels=4)
    model = vq_ldm(
        first_stage_config={
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": TINY_VAE, "lossconfig": IDENTITY},
        },
        unet_config=unet,
        channels=4,
    )
    train = {"target": "ldm.data.lsun.LSUNChurchesTrain", "params": {"size": 16, "location": str(tmp_path / "lsun")}}
    logdir, state = run(tmp_path, "lsun", model, data_section(train), 4, NO_IMAGES)
    assert diffusion_losses(logdir, 4)
    assert not any(k.startswith("cond_stage_model.") for k in state["state_dict"])


def test_super_resolution_ldm_with_concat_conditioning(tmp_path, imagenet):
    model = vq_ldm(
        cond_stage_config={"target": "torch.nn.Identity"},
        cond_stage_key="LR_image",
        conditioning_key="concat",
    )
    model["params"]["unet_config"]["params"]["in_channels"] = 6  # 3 latent + 3 low-res image channels, both 8x8
    train = {
        "target": "ldm.data.imagenet.ImageNetSRTrain",
        "params": {"data_root": str(imagenet), "size": 16, "degradation": "bsrgan_light", "downscale_f": 2},
    }
    logdir, _ = run(
        tmp_path, "sr", model, data_section(train), 4,
        "lightning.callbacks.image_logger.params.batch_frequency=4",
        "lightning.callbacks.image_logger.params.increase_log_steps=false",
    )  # fmt: skip
    assert diffusion_losses(logdir, 4)
    images = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstruction", "samples"} <= images  # sampled with the low-res images concatenated


def test_x4_upscaler_on_imagenet_sr_pairs(tmp_path, imagenet):
    # ImageNetSR has no captions: the class label takes the prompt's place in cross-attention.
    model = tiny_upscaler(
        first_stage_key="image",
        low_scale_key="LR_image",
        cond_stage_key="class_label",
        cond_stage_config={**CLASSES, "params": {**CLASSES["params"], "key": "class_label"}},
    )
    train = {
        "target": "ldm.data.imagenet.ImageNetSRTrain",
        "params": {"data_root": str(imagenet), "size": 32, "degradation": "bsrgan_light", "downscale_f": 4},
    }
    logdir, state = run(tmp_path, "x4", {"base_learning_rate": 1e-3, **model}, data_section(train), 3, NO_IMAGES)
    assert diffusion_losses(logdir, 3)
    assert state["state_dict"]["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 7  # latent + low-res
    assert any(k.startswith("low_scale_model.") for k in state["state_dict"])  # its noise schedule
