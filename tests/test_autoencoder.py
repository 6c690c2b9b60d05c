"""The first stage: VAE parity with the original, checkpoint key layout, and the Gaussian posterior."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, make_attn
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

PREFIX = "first_stage_model."

SD_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

SMALL_DDCONFIG = {**SD_DDCONFIG, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1}


@pytest.fixture(scope="module")
def tiny_vae(tiny_dir: Path, tiny_weights: dict[str, torch.Tensor]) -> AutoencoderKL:
    config = OmegaConf.load(tiny_dir / "original-config.yaml").model.params.first_stage_config
    vae = instantiate_from_config(config)
    state = {k.removeprefix(PREFIX): v for k, v in tiny_weights.items() if k.startswith(PREFIX)}
    vae.load_state_dict(state, strict=True)
    return vae.eval()


def test_encode_matches_original(tiny_vae, tiny_cases, assert_matches_reference):
    with torch.no_grad():
        posterior = tiny_vae.encode(tiny_cases["vae_image"])
    assert_matches_reference(posterior.mean, tiny_cases["vae_posterior_mean"])
    assert_matches_reference(posterior.logvar, tiny_cases["vae_posterior_logvar"])


def test_decode_matches_original(tiny_vae, tiny_cases, assert_matches_reference):
    with torch.no_grad():
        decoded = tiny_vae.decode(tiny_cases["vae_z"])
    assert_matches_reference(decoded, tiny_cases["vae_decoded"])


def _reference_keys(path: Path) -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, _dtype = line.split("\t")
        if key.startswith(PREFIX):
            rows[key.removeprefix(PREFIX)] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return rows


@pytest.mark.parametrize("keys_file", ["sd-v1-keys.tsv", "sd-v2-keys.tsv"])
def test_sd_state_dict_layout(reference_dir: Path, keys_file: str):
    with torch.device("meta"):
        vae = AutoencoderKL(SD_DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == _reference_keys(reference_dir / keys_file)


@pytest.mark.parametrize("height, width", [(24, 40), (36, 20)])
def test_non_square_shapes(height: int, width: int):
    torch.manual_seed(0)
    vae = AutoencoderKL(SMALL_DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        reconstruction, posterior = vae(x, sample_posterior=False)
    assert posterior.mean.shape == (2, 4, height // 4, width // 4)
    assert reconstruction.shape == x.shape


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h = block.norm(x)
    q, k, v = (t.flatten(2) for t in (block.q(h), block.k(h), block.v(h)))  # (B, C, N)
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    expected = x + block.proj_out(torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape))
    torch.testing.assert_close(block(x), expected)


def test_resnet_block_shortcuts_and_timestep_embedding():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 4)
    plain = ResnetBlock(in_channels=32, out_channels=64, dropout=0.0, temb_channels=0)
    assert plain.nin_shortcut.kernel_size == (1, 1) and not hasattr(plain, "temb_proj")
    block = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, dropout=0.0, temb_channels=16)
    assert block.conv_shortcut.kernel_size == (3, 3)
    temb = torch.randn(2, 16)
    with torch.no_grad():
        with_temb = block(x, temb)
        assert with_temb.shape == (2, 64, 6, 4)
        assert not torch.allclose(with_temb, block(x))
        block.temb_proj.weight.zero_()
        block.temb_proj.bias.zero_()
        # A zero projection makes the timestep embedding a no-op.
        torch.testing.assert_close(block(x, temb), block(x))


def test_downsample_pads_right_and_bottom():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = Downsample(1, with_conv=True)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left tap of each stride-2 window
        down.conv.bias.zero_()
    # Without left/top padding the top-left taps are x[0::2, 0::2] exactly.
    torch.testing.assert_close(down(x), x[:, :, 0::2, 0::2])
    torch.testing.assert_close(Downsample(1, with_conv=False)(x), torch.nn.functional.avg_pool2d(x, 2))


def test_attention_types():
    assert isinstance(make_attn(32, "vanilla"), AttnBlock)
    assert isinstance(make_attn(32, "vanilla-xformers"), AttnBlock)
    assert isinstance(make_attn(32, "none"), torch.nn.Identity)
    with pytest.raises(ValueError, match="attn_type 'linear'"):
        Encoder(**SMALL_DDCONFIG, use_linear_attn=True)
    with pytest.raises(ValueError, match="attn_type 'bogus'"):
        Decoder(**SMALL_DDCONFIG, attn_type="bogus")
    encoder = Encoder(**SMALL_DDCONFIG, attn_type="none")
    assert not any(".attn" in k for k in encoder.state_dict())


def test_attn_resolutions_place_blocks():
    encoder = Encoder(**{**SMALL_DDCONFIG, "attn_resolutions": [128]})
    decoder = Decoder(**{**SMALL_DDCONFIG, "attn_resolutions": [128]})
    # Level 1 of 3 runs at 256 / 2 = 128: one attention per ResnetBlock there, none elsewhere.
    assert [len(level.attn) for level in encoder.down] == [0, 1, 0]
    assert [len(level.attn) for level in decoder.up] == [0, 2, 0]


def test_get_input_is_contiguous_bchw_float():
    vae = AutoencoderKL(SMALL_DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4, image_key="jpg")
    image = torch.randint(0, 255, (2, 8, 6, 3), dtype=torch.uint8)
    x = vae.get_input({"jpg": image}, "jpg")
    assert x.shape == (2, 3, 8, 6) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x[1, 2], image[1, :, :, 2].float())


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage(vq_interface=True)
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x
    assert stage.quantize(x) == (x, None, (None, None, None))
    assert IdentityFirstStage().quantize(x) is x


def test_kl_to_standard_normal_closed_form():
    mean = torch.tensor([0.5, -1.0]).reshape(1, 2, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0)]).reshape(1, 2, 1, 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per dimension.
    expected = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4.0))
    torch.testing.assert_close(posterior.kl(), torch.tensor([expected]))
    torch.testing.assert_close(posterior.kl(posterior), torch.zeros(1))
    # N(0.5, 1) at 0.5: -log p = log(2 pi) / 2; N(-1, 4) at 1: (log(2 pi) + log 4 + 4 / 4) / 2.
    sample = torch.tensor([0.5, 1.0]).reshape(1, 2, 1, 1)
    nll = 0.5 * math.log(2 * math.pi) + 0.5 * (math.log(2 * math.pi) + math.log(4.0) + 1.0)
    torch.testing.assert_close(posterior.nll(sample), torch.tensor([nll]))


def test_logvar_is_clamped():
    parameters = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 100.0)], dim=1)
    posterior = DiagonalGaussianDistribution(parameters)
    assert posterior.logvar.max().item() == 20.0
    torch.testing.assert_close(posterior.std, torch.exp(torch.tensor(10.0)).expand(1, 1, 2, 2))


def test_sample_is_reproducible_with_generator():
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    first = posterior.sample(torch.Generator().manual_seed(42))
    second = posterior.sample(torch.Generator().manual_seed(42))
    other = posterior.sample(torch.Generator().manual_seed(43))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert first.shape == posterior.mean.shape


def test_deterministic_posterior_has_zero_std():
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4), deterministic=True)
    assert torch.count_nonzero(posterior.std) == 0 and torch.count_nonzero(posterior.var) == 0
    assert torch.equal(posterior.sample(), posterior.mode())
    assert torch.equal(posterior.kl(), torch.zeros(1))
