"""DDPM ancestral sampling (p_sample_loop) and the 9-channel inpainting model."""

import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.checkpoint import CheckpointError, load_model_from_config
from ldm.models.diffusion.ddpm import LatentInpaintDiffusion
from ldm.models.diffusion.guidance import GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.util import apply_overrides, instantiate_from_config

INPAINT_OVERRIDES = [
    "model.target=ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    "model.params.conditioning_key=hybrid",
    "model.params.unet_config.params.in_channels=9",
]


@pytest.fixture
def analytic_ddpm(tiny_model, monkeypatch):
    """The tiny LatentDiffusion's schedule and sampling loop with an exact predictor for N(0.5, 0.7^2) data."""
    exact = GaussianDataModel(mu=0.5, s=0.7)
    monkeypatch.setattr(tiny_model, "apply_model", exact.apply_model)
    return tiny_model


def test_ancestral_sampling_reproduces_the_data_distribution(analytic_ddpm):
    # One sample of 64x64 independent values: per-sample generators make a batch of 4096 needlessly slow.
    x = analytic_ddpm.p_sample_loop(None, (1, 1, 64, 64), noise=Noise([0]), clip_denoised=False, progress=False)
    # Standard errors: 0.7 / sqrt(4096) = 0.011 for the mean, about 0.008 for the std.
    assert abs(x.mean().item() - 0.5) < 0.04
    assert abs(x.std().item() - 0.7) < 0.04


def test_ancestral_sampling_is_batch_invariant(analytic_ddpm):
    batch = analytic_ddpm.p_sample_loop(None, (3, 1, 2, 2), noise=Noise.from_seed(7, 3), progress=False)
    for i in range(3):
        single = analytic_ddpm.p_sample_loop(None, (1, 1, 2, 2), noise=Noise([7 + i]), progress=False)
        torch.testing.assert_close(batch[i : i + 1], single)


def test_ancestral_sampling_keeps_the_known_region(analytic_ddpm):
    x0 = torch.full((2, 1, 2, 2), 0.3)
    mask = torch.zeros(2, 1, 2, 2)
    mask[..., 0] = 1.0
    x = analytic_ddpm.p_sample_loop(None, (2, 1, 2, 2), noise=Noise.from_seed(1, 2), mask=mask, x0=x0, progress=False)
    torch.testing.assert_close(x[..., 0], x0[..., 0])
    assert not torch.allclose(x[..., 1], x0[..., 1])


def test_ancestral_sampling_rejects_wrong_x_T(analytic_ddpm):
    with pytest.raises(ValueError, match="x_T has shape"):
        analytic_ddpm.p_sample_loop(None, (1, 1, 2, 2), x_T=torch.zeros(1, 1, 3, 3), progress=False)


@pytest.fixture(scope="module")
def inpaint_model(tiny_config):
    return instantiate_from_config(apply_overrides(tiny_config, INPAINT_OVERRIDES).model, path="model").eval()


def test_inpainting_conditioning_has_mask_and_masked_latent(inpaint_model):
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1.0
    c_cat = inpaint_model.inpainting_conditioning(image, mask)
    assert c_cat.shape == (2, 5, 8, 8)
    torch.testing.assert_close(c_cat[:, :1], torch.nn.functional.interpolate(mask, size=(8, 8)))
    masked_latent = inpaint_model.scale_factor * inpaint_model.encode_first_stage(image * (1 - mask)).mode()
    torch.testing.assert_close(c_cat[:, 1:], masked_latent)


def test_inpainting_model_runs_guided_with_hybrid_conditioning(inpaint_model):
    c_cat = inpaint_model.inpainting_conditioning(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
    text = torch.randn(1, 77, 32)
    cond = {"c_concat": [c_cat], "c_crossattn": [text]}
    uncond = {"c_concat": [c_cat], "c_crossattn": [torch.zeros_like(text)]}
    guided = GuidedEps(inpaint_model, cond, uncond, scale=5.0)
    assert guided.batched is not None, "uncond and cond go through the UNet in one batch"
    x = torch.randn(1, 4, 8, 8)
    eps = guided(x, 500)
    e_u = inpaint_model.apply_model(x, torch.tensor([500.0]), uncond)
    e_c = inpaint_model.apply_model(x, torch.tensor([500.0]), cond)
    torch.testing.assert_close(eps, e_u + 5.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_ordinary_checkpoint_into_inpainting_config(tiny_config, tiny_dir, tiny_weights):
    config = apply_overrides(tiny_config, INPAINT_OVERRIDES)
    with pytest.raises(CheckpointError, match="4 input channels, the config's 9: an ordinary model.*finetune_keys"):
        load_model_from_config(config, tiny_dir / "model.safetensors", device="cpu")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    config = apply_overrides(
        config, [f"model.params.ckpt_path={tiny_dir / 'model.safetensors'}", f"model.params.finetune_keys=[{key}]"]
    )
    model = instantiate_from_config(config.model, path="model")
    assert isinstance(model, LatentInpaintDiffusion)
    weight = model.state_dict()[key]
    torch.testing.assert_close(weight[:, :4], tiny_weights[key])
    assert bool((weight[:, 4:] == 0).all())


def test_the_model_owns_what_a_pipeline_needs(inpaint_model, tiny_model):
    assert set(tiny_model.stages()) == {"unet", "first_stage", "cond_stage"}
    assert tiny_model.stages()["unet"] is tiny_model.model
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    latent = tiny_model.encode_image(image)
    assert latent.shape == (1, 4, 8, 8) and torch.equal(latent, tiny_model.encode_image(image)), "no random draw"
    assert not tiny_model.inpaints_by_conditioning and tiny_model.image_conditioning(image, None) is None
    text = torch.randn(3, 77, 32)
    assert tiny_model.sampling_conditioning(text, None) is text

    assert inpaint_model.inpaints_by_conditioning
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1.0
    image_cond = inpaint_model.image_conditioning(image, mask)
    torch.testing.assert_close(image_cond, inpaint_model.inpainting_conditioning(image, mask))
    blank = inpaint_model.image_conditioning(None, torch.ones(1, 1, 16, 16))
    torch.testing.assert_close(
        blank, inpaint_model.inpainting_conditioning(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
    )
    cond = inpaint_model.sampling_conditioning(text, image_cond)
    assert cond["c_crossattn"] == [text] and cond["c_concat"][0].shape == (3, 5, 8, 8)
