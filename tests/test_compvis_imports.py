"""Names that code written against CompVis imports: they exist at their CompVis paths and compute the right thing."""

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.schedules import make_ddim_timesteps as project_ddim_timesteps
from ldm.modules.attention import LinearAttention
from ldm.modules.diffusionmodules.util import (
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    normal_kl,
)
from ldm.util import isimage, ismap, log_txt_as_img, mean_flat


def test_normal_kl_is_the_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean1, logvar1, mean2, logvar2 = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, (0.5 * logvar1).exp()),
        torch.distributions.Normal(mean2, (0.5 * logvar2).exp()),
    )
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected)
    assert normal_kl(mean1, logvar1, mean1, logvar1).abs().max() < 1e-12
    # Floats broadcast: KL(N(m, 1) || N(0, 1)) = m^2 / 2.
    torch.testing.assert_close(normal_kl(mean1, 0.0, 0.0, 0.0), mean1**2 / 2)
    with pytest.raises(TypeError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_make_ddim_timesteps_is_the_project_grid_in_compvis_form():
    # For S dividing T, CompVis's uniform grid is arange(0, T, T // S) + 1.
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 50, 1000), np.arange(0, 1000, 20) + 1)
    quad = make_ddim_timesteps("quad", 50, 1000, verbose=False)
    original_quad = (np.linspace(0, math.sqrt(800), 50) ** 2).astype(int) + 1
    np.testing.assert_array_equal(quad, np.unique(original_quad))
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 30, 1000), project_ddim_timesteps(30, 1000))


def test_make_ddim_sampling_parameters_follow_compvis_definitions(capsys):
    alphacums = np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012))
    timesteps = make_ddim_timesteps("uniform", 10, 1000)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(torch.tensor(alphacums), timesteps, eta=1.0)
    np.testing.assert_allclose(alphas, alphacums[timesteps])
    np.testing.assert_allclose(alphas_prev, np.concatenate([alphacums[:1], alphacums[timesteps[:-1]]]))
    expected = np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    np.testing.assert_allclose(sigmas, expected)
    deterministic, *_ = make_ddim_sampling_parameters(alphacums, timesteps, eta=0.0, verbose=True)
    assert not deterministic.any() and "sigma_t schedule" in capsys.readouterr().out


def test_mean_flat_ismap_isimage():
    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
    assert isimage(torch.zeros(2, 3, 8, 8)) and isimage(torch.zeros(1, 1, 8, 8))
    assert not isimage(torch.zeros(2, 4, 8, 8)) and not isimage(np.zeros((2, 3, 8, 8)))
    assert ismap(torch.zeros(2, 4, 8, 8)) and not ismap(torch.zeros(2, 3, 8, 8)) and not ismap(torch.zeros(4, 8, 8))


def test_log_txt_as_img_draws_wrapped_captions_in_minus_one_to_one():
    long = "a painting of a virus monster playing guitar " * 4
    images = log_txt_as_img((128, 96), ["", "hi", long], size=10)
    assert images.shape == (3, 3, 96, 128) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert (images[0] == 1).all(), "an empty caption is a white image"
    ink = (images < 0).any(dim=1)  # (B, H, W): where text is drawn
    assert ink[1].any() and not ink[1, 20:].any(), "a short caption stays on the first line"
    assert ink[2, 40:].any(), "a long caption wraps onto lower lines instead of running off the right edge"
    assert log_txt_as_img((64, 32), []).shape == (0, 3, 32, 64)


def test_linear_attention_is_softmax_kernel_attention():
    torch.manual_seed(0)
    attention = LinearAttention(dim=8, heads=2, dim_head=4)
    shapes = {k: tuple(v.shape) for k, v in attention.state_dict().items()}
    assert shapes == {"to_qkv.weight": (24, 8, 1, 1), "to_out.weight": (8, 8, 1, 1), "to_out.bias": (8,)}
    x = torch.randn(2, 8, 3, 5)
    qkv = attention.to_qkv(x).flatten(2)  # (B, 24, N): channels are q, k, v, each head after head (CompVis order)
    heads = []
    for h in range(2):
        q, k, v = (qkv[:, part * 8 + h * 4 : part * 8 + h * 4 + 4] for part in range(3))  # (B, 4, N)
        weights = k.softmax(dim=-1)  # each key channel: a distribution over the N positions
        context = torch.einsum("bdn,ben->bde", weights, v)
        heads.append(torch.einsum("bde,bdn->ben", context, q))
    expected = attention.to_out(torch.cat(heads, dim=1).reshape(2, 8, 3, 5))
    torch.testing.assert_close(attention(x), expected)


ENCODER = dict(
    image_size=16,
    in_channels=3,
    model_channels=32,
    out_channels=10,
    num_res_blocks=1,
    attention_resolutions=[2],
    channel_mult=[1, 2],
    num_head_channels=16,
)


def test_encoder_unet_is_the_unets_encoder_half():
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel, UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**ENCODER).eval()
    encoder = EncoderUNetModel(**ENCODER).eval()
    shared = {k: v for k, v in unet.state_dict().items() if k.startswith(("time_embed.", "input_blocks.", "middle"))}
    assert {k: v.shape for k, v in shared.items()} == {
        k: v.shape for k, v in encoder.state_dict().items() if not k.startswith("out.")
    }
    encoder.load_state_dict(shared, strict=False)
    captured = []
    for model in (unet, encoder):
        model.middle_block.register_forward_hook(lambda _module, _args, out: captured.append(out))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        unet(x, t)
        assert encoder(x, t).shape == (2, 10)
    torch.testing.assert_close(captured[1], captured[0])


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_unet_pools_give_one_vector_per_image(pool):
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel

    encoder = EncoderUNetModel(**ENCODER, pool=pool)
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 10)
    with pytest.raises(ValueError, match="pool must be one of"):
        EncoderUNetModel(**ENCODER, pool="max")


def test_attention_pool_is_the_mean_token_attending_over_all_positions():
    from ldm.modules.diffusionmodules.encoder_unet import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=8, num_heads_channels=4, output_dim=5)
    x = torch.randn(2, 8, 3, 3)
    tokens = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], dim=-1) + pool.positional_embedding
    qkv = pool.qkv_proj(tokens)  # (B, 24, 10): q, k, v, each head after head
    heads = []
    for h in range(2):
        q, k, v = (qkv[:, part * 8 + h * 4 : part * 8 + h * 4 + 4] for part in range(3))  # (B, 4, 10)
        weights = torch.softmax(torch.einsum("bd,bdn->bn", q[:, :, 0], k) / 2.0, dim=-1)  # 1 / sqrt(head width 4)
        heads.append(torch.einsum("bn,bdn->bd", weights, v))
    expected = pool.c_proj(torch.cat(heads, dim=1)[:, :, None])[:, :, 0]
    torch.testing.assert_close(pool(x), expected)


def test_the_compvis_script_helpers_exist_where_notebooks_import_them(tmp_path):
    import importlib

    from PIL import Image

    from ldm.checkpoint import load_model_from_config
    from ldm.models.diffusion.ddpm import disabled_train

    assert importlib.import_module("scripts.txt2img").load_model_from_config is load_model_from_config
    load_img = importlib.import_module("scripts.img2img").load_img
    pixels = np.zeros((70, 100, 3), dtype=np.uint8)
    pixels[:, :50] = 255
    Image.fromarray(pixels).save(tmp_path / "init.png")
    image = load_img(tmp_path / "init.png")
    assert image.shape == (1, 3, 64, 96) and image.dtype == torch.float32  # sides cut to multiples of 32
    assert image[..., :40].min() > 0.99 and image[..., 56:].max() < -0.99
    frozen = torch.nn.Linear(2, 2).eval()
    assert disabled_train(frozen, True) is frozen and not frozen.training
