"""The SD 2.x x4 upscaler: ``LatentUpscaleDiffusion`` and the low-res noise augmentation of ``upscaling.py``.

The real config is built on the meta device against the original's state-dict listing; a tiny upscaler (tiny UNet,
VAE and OpenCLIP text tower, all built here) samples, guides and trains on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.errors import UserError
from ldm.models.diffusion import ddpm, latent_upscale
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation, SimpleImageConcat
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
X4_CONFIG = "original/stablediffusion/configs/stable-diffusion/x4-upscaling.yaml"
TARGET = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
LOW, HIGH = 8, 32  # low-res side and output side: the tiny VAE has f = 4, as the x4 model's
PROMPTS = ["a red circle", "a blue square"]


def low_scale_config(max_noise_level: int = 350) -> dict:
    return {
        "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
        "params": {
            "noise_schedule_config": {"linear_start": 1e-4, "linear_end": 0.02},
            "max_noise_level": max_noise_level,
        },
    }


def tiny_config(**params) -> dict:
    """x4-upscaling.yaml's structure at toy size."""
    unet = {
        "image_size": LOW,
        "in_channels": 7,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_classes": 1000,
        "num_heads": 4,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 32,
        "legacy": False,
        "use_linear_in_transformer": True,
    }
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": HIGH,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    text = {"width": 32, "heads": 4, "layers": 2, "context_length": 77, "vocab_size": 49408}
    return {
        "target": TARGET,
        "params": {
            "parameterization": "v",
            "low_scale_key": "lr",
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": LOW,
            "channels": 4,
            "conditioning_key": "hybrid-adm",
            "scale_factor": 0.08333,
            "use_ema": False,
            "low_scale_config": low_scale_config(),
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate", "text_cfg": text},
            },
            **params,
        },
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = instantiate_from_config(tiny_config()).eval()
    # The UNet's output convolutions start at zero; an untrained model must still depend on its inputs.
    with torch.no_grad():
        for p in built.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05)
    return built


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) smooth images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")


def read_keys(path) -> dict[str, tuple[str, str]]:
    rows = path.read_text().splitlines()[1:]
    return {key: (shape, dtype) for key, shape, dtype in (row.split("\t") for row in rows)}


# -- the real config --


@pytest.mark.parametrize("bundled", [False, True], ids=["original", "configs/stable-diffusion"])
def test_x4_config_builds_the_reference_state_dict(reference_dir, bundled):
    config = load_config(ROOT / "configs/stable-diffusion/x4-upscaling.yaml" if bundled else reference_dir / X4_CONFIG)
    with torch.device("meta"):
        built = instantiate_from_config(config.model, path="model")
    assert isinstance(built, latent_upscale.LatentUpscaleDiffusion)
    expected = read_keys((reference_dir / X4_CONFIG).with_suffix(".keys.tsv"))
    actual = {
        k: ("x".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in built.state_dict().items()
    }
    assert sorted(set(expected) - set(actual)) == [], "keys missing from the model"
    assert sorted(set(actual) - set(expected)) == [], "keys the reference does not have"
    assert {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]} == {}
    assert built.low_scale_model.max_noise_level == 350
    assert built.model.diffusion_model.label_emb.num_embeddings == 1000
    # At real size (on meta: shapes only) a low-res image conditions a latent of its size, decoded 4x larger.
    with torch.device("meta"):
        low = torch.zeros(2, 3, 32, 48)
        cond = built.sampling_conditioning(torch.zeros(2, 77, 1024), built.image_conditioning(low, noise_level=20))
        out = built.apply_model(torch.zeros(built.latent_shape(low)), torch.tensor([999, 999]), cond)
        assert out.shape == (2, 4, 32, 48)
        assert built.decode_first_stage(out).shape == (2, 3, 128, 192)


def test_the_stability_path_names_the_class():
    assert get_obj_from_str(TARGET) is latent_upscale.LatentUpscaleDiffusion
    assert "LatentUpscaleDiffusion" in dir(ddpm)


# -- noise augmentation --


def test_simple_image_concat_is_the_identity_at_level_zero():
    x = torch.randn(2, 3, 4, 4)
    out, level = SimpleImageConcat()(x)
    assert out is x and level.tolist() == [0, 0]
    with pytest.raises(UserError, match="noise_level 0"):
        SimpleImageConcat()(x, noise_level=5)


def test_noise_augmentation_follows_its_schedule():
    augment = ImageConcatWithNoiseAugmentation(low_scale_config()["params"]["noise_schedule_config"], 350)
    # The SD "linear" schedule, written out: betas linear in sqrt space.
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4**0.5, 0.02**0.5, 1000) ** 2)
    x, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    levels = torch.tensor([0, 20, 349])
    out, returned = augment(x, noise_level=levels, noise=eps)
    a = torch.tensor(alphas_cumprod[levels.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, a.sqrt() * x + (1 - a).sqrt() * eps)
    assert torch.equal(returned, levels)
    # Level 0 is the identity up to the schedule's first beta (1e-4): at most 1% of the noise gets in.
    clean, _ = augment(x, noise_level=0, noise=torch.zeros_like(x))
    torch.testing.assert_close(clean, x, rtol=1e-4, atol=0)
    assert float((augment(x, noise_level=0, noise=eps)[0] - x).abs().max()) < 0.011 * float(eps.abs().max()) + 1e-3


def test_noise_augmentation_draws_training_levels_below_the_maximum():
    augment = ImageConcatWithNoiseAugmentation({}, max_noise_level=5)
    _, levels = augment(torch.zeros(200, 1, 1, 1))
    assert levels.dtype == torch.long and set(levels.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("level", [1000, -1, 2.5, torch.tensor([1, 2, 3])])
def test_a_bad_noise_level_is_a_user_error(level):
    with pytest.raises(UserError, match="noise_level"):
        ImageConcatWithNoiseAugmentation({}, 350)(torch.zeros(2, 3, 4, 4), noise_level=level)


def test_max_noise_level_beyond_the_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="max_noise_level"):
        ImageConcatWithNoiseAugmentation({"timesteps": 100}, max_noise_level=350)


# -- the model --


@pytest.mark.parametrize(
    "params, match", [({"conditioning_key": "crossattn"}, "low-res image"), ({"cond_stage_trainable": True}, "frozen")]
)
def test_configs_that_cannot_upscale_are_refused(params, match):
    with torch.device("meta"), pytest.raises(ConfigError, match=match):
        instantiate_from_config(tiny_config(**params))


def test_image_conditioning_feeds_the_unet(model):
    low = smooth_images(1, LOW, seed=1)
    image_cond = model.image_conditioning(low, noise_level=20, noise=torch.zeros_like(low))
    cond = model.get_learned_conditioning(PROMPTS)
    c = model.sampling_conditioning(cond, image_cond)
    assert c["c_concat"][0].shape == (2, 3, LOW, LOW) and c["c_adm"].tolist() == [20, 20]
    assert c["c_crossattn"][0] is cond
    x, t = torch.randn(2, 4, LOW, LOW), torch.tensor([500, 500])
    out = model.apply_model(x, t, c)
    assert out.shape == x.shape
    # Both the image and the noise level reach the UNet.
    other_level = model.sampling_conditioning(cond, model.image_conditioning(low, noise_level=300, noise=0 * low))
    other_image = model.sampling_conditioning(cond, model.image_conditioning(-low, noise_level=20, noise=0 * low))
    assert not torch.allclose(model.apply_model(x, t, other_level), out)
    assert not torch.allclose(model.apply_model(x, t, other_image), out)
    with pytest.raises(UserError, match="mask"):
        model.image_conditioning(low, torch.ones(1, 1, LOW, LOW))
    with pytest.raises(UserError, match="image_conditioning"):
        model.sampling_conditioning(cond, None)


@pytest.mark.parametrize("sampler", ["ddim", "DPM++ 2M Karras"])
def test_samples_with_guidance_through_the_sampler_front_end(model, sampler):
    low = smooth_images(1, LOW, seed=2)
    image_cond = model.image_conditioning(low, noise_level=20)
    cond = model.sampling_conditioning(model.get_learned_conditioning(PROMPTS[:1]), image_cond)
    uncond = model.sampling_conditioning(model.get_unconditional_conditioning(1), image_cond)

    def run(c, steps=4):
        return sample(
            model,
            sampler,
            steps,
            c,
            uncond,
            4.0,
            shape=model.latent_shape(low),
            noise=Noise([7], "cpu"),
            progress=False,
        )

    latents = run(cond)
    assert latents.shape == (1, 4, LOW, LOW) and torch.isfinite(latents).all()
    torch.testing.assert_close(run(cond), latents)  # seeded: the augmentation was drawn once, in image_conditioning
    assert not torch.allclose(
        run(model.sampling_conditioning(cond["c_crossattn"][0], model.image_conditioning(-low))), latents
    )
    assert model.decode_first_stage(latents).shape == (1, 3, HIGH, HIGH)


def test_compvis_ddim_sampler_takes_the_conditioning_dicts(model):
    low = smooth_images(2, LOW, seed=3)
    image_cond = model.image_conditioning(low, noise_level=torch.tensor([10, 40]))
    cond = model.sampling_conditioning(model.get_learned_conditioning(PROMPTS), image_cond)
    uncond = model.unconditional_like(cond, 2)
    assert uncond["c_concat"] == cond["c_concat"] and uncond["c_adm"] is cond["c_adm"]
    x_T = Noise([1, 2], "cpu").randn((2, 4, LOW, LOW))
    samples, intermediates = DDIMSampler(model).sample(
        5, 2, (4, LOW, LOW), cond, verbose=False, x_T=x_T, unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
    )  # fmt: skip
    expected = sample(model, "ddim", 5, cond, uncond, 3.0, x_T=x_T, progress=False)
    torch.testing.assert_close(samples, expected)
    assert len(intermediates["x_inter"]) >= 2


def batch(n: int = 2, seed: int = 0) -> dict:
    high = smooth_images(n, HIGH, seed)
    low = torch.nn.functional.interpolate(high, size=LOW, mode="area")
    return {"jpg": high.permute(0, 2, 3, 1), "lr": low.permute(0, 2, 3, 1), "txt": PROMPTS[:n]}


def test_get_input_noises_the_batch_low_res_images(model):
    z, c = model.get_input(batch(), "jpg")
    assert z.shape == (2, 4, LOW, LOW) and c["c_crossattn"][0].shape == (2, 77, 32)
    assert c["c_concat"][0].shape == (2, 3, LOW, LOW)
    assert c["c_adm"].dtype == torch.long and bool(((c["c_adm"] >= 0) & (c["c_adm"] < 350)).all())
    keyed = instantiate_from_config(tiny_config(noise_level_key="level"))
    _, c = keyed.get_input({**batch(), "level": torch.tensor([0, 0])}, "jpg")
    torch.testing.assert_close(c["c_concat"][0], batch()["lr"].permute(0, 3, 1, 2), rtol=1e-4, atol=0.05)
    assert c["c_adm"].tolist() == [0, 0]
    with pytest.raises(UserError, match="low_scale_key"):
        model.get_input({k: v for k, v in batch().items() if k != "lr"}, "jpg")


def test_trains_two_steps_and_logs_images(tmp_path):
    torch.manual_seed(0)
    trained = instantiate_from_config(tiny_config())
    trained.learning_rate = 1e-3
    before = trained.model.diffusion_model.out[2].weight.detach().clone()
    items = [{k: v[i] for k, v in batch().items()} for i in range(2)] * 2
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|eval mode|LeafSpec|val_dataloader|resumable).*")
        trainer.fit(trained, DataLoader(items, batch_size=2))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(trained.model.diffusion_model.out[2].weight, before)
    assert not any(p.requires_grad for p in trained.first_stage_model.parameters())
    log = trained.log_images(batch(), N=2, ddim_steps=2, unconditional_guidance_scale=2.0)
    assert {"inputs", "reconstruction", "samples", "samples_cfg", "x_lr"} <= set(log)
    assert log["samples_cfg"].shape == (2, 3, HIGH, HIGH) and log["x_lr"].shape == (2, 3, LOW, LOW)

    # A checkpoint of it (with the low-scale schedule) loads back strictly through ckpt_path.
    path = tmp_path / "upscaler.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)
    loaded = instantiate_from_config(tiny_config(ckpt_path=str(path)))
    assert loaded.restarted_from_ckpt
    torch.testing.assert_close(loaded.model.diffusion_model.out[2].weight, trained.model.diffusion_model.out[2].weight)


# -- the Python entry point --


def test_upscale_gives_seeded_images_four_times_larger(model):
    from PIL import Image

    from ldm.upscale import upscale

    pixels = ((smooth_images(1, LOW, seed=4)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    small = Image.fromarray(pixels)
    settings = {"steps": 3, "scale": 3.0, "progress": False}
    pair = upscale(model, small, "a red circle", n=2, seed=5, **settings)
    assert [im.size for im in pair] == [(HIGH, HIGH)] * 2
    single = upscale(model, small, "a red circle", seed=6, **settings)[0]
    difference = np.abs(np.asarray(single, dtype=int) - np.asarray(pair[1], dtype=int))
    assert difference.max() <= 1  # image i of a batch is the run with seed + i
    assert not np.array_equal(np.asarray(pair[0]), np.asarray(pair[1]))
    with pytest.raises(UserError, match="multiples of 2"):
        upscale(model, small.crop((0, 0, LOW - 1, LOW)), **settings)
    with pytest.raises(UserError, match="LatentUpscaleDiffusion"):
        upscale(object(), small, **settings)


def test_the_text_to_image_entry_points_name_the_upscaler_entry_point(tmp_path, capsys):
    from ldm import cli
    from ldm.geometry import LatentGeometry
    from ldm.util import load_config

    config = load_config(ROOT / "configs" / "stable-diffusion" / "x4-upscaling.yaml")
    with pytest.raises(UserError, match="LatentUpscaleDiffusion model, not a text-to-image one: upscale an image"):
        LatentGeometry.from_config(config)
    ckpt = tmp_path / "x4.safetensors"
    ckpt.write_bytes(b"")
    args = ["--config", str(ROOT / "configs" / "stable-diffusion" / "x4-upscaling.yaml"), "--ckpt", str(ckpt)]
    assert cli.main("txt2img", args) == 2
    assert "ldm.upscale.upscale(model, image, prompt)" in capsys.readouterr().err
