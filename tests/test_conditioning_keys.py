"""How LDM conditioning reaches the UNet (``conditioning_key`` concat / crossattn / hybrid / adm, and
``__is_unconditional__``), and sampling of the image-conditioned family members (super-resolution, semantic
synthesis, inpainting) on tiny versions of their configs."""

import pytest
import torch
import torch.nn.functional as F
from ldm_family import IMAGE, LATENT, tiny_model

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.modules.encoders.modules import SpatialRescaler

B = 2


@pytest.fixture
def unet_calls(monkeypatch):
    """``watch(model)`` records (x, context, y) of every call of the model's UNet."""
    calls = []

    def watch(model):
        unet = model.model.diffusion_model
        forward = unet.forward

        def recording(x, timesteps=None, context=None, y=None, **kwargs):
            calls.append((x, context, y))
            return forward(x, timesteps, context=context, y=y, **kwargs)

        monkeypatch.setattr(unet, "forward", recording)
        return calls

    return watch


def latents(channels: int = 3) -> torch.Tensor:
    return torch.randn(B, channels, LATENT, LATENT, generator=torch.Generator().manual_seed(0))


def timesteps() -> torch.Tensor:
    return torch.tensor([10, 500])


def test_concat_appends_the_conditioning_to_the_input_channels(unet_calls):
    model = tiny_model("bsr_sr")
    calls = unet_calls(model)
    z, low_res = latents(), torch.rand(B, 3, LATENT, LATENT)
    out = model.apply_model(z, timesteps(), model.get_learned_conditioning(low_res))
    ((x, context, y),) = calls
    assert torch.equal(x, torch.cat([z, low_res], dim=1)) and context is None and y is None
    assert out.shape == z.shape


def test_crossattn_gives_the_encoding_as_context(unet_calls):
    model = tiny_model("cin256")
    calls = unet_calls(model)
    c = model.get_learned_conditioning({"class_label": torch.tensor([3, 7])})
    model.apply_model(latents(4), timesteps(), c)
    ((x, context, y),) = calls
    assert x.shape[1] == 4 and torch.equal(context, c) and context.shape == (B, 1, 32) and y is None


def test_hybrid_gives_both(unet_calls):
    model = tiny_model(
        "bsr_sr",
        "model.params.conditioning_key=hybrid",
        "model.params.unet_config.params.use_spatial_transformer=true",
        "model.params.unet_config.params.context_dim=16",
    )
    calls = unet_calls(model)
    z, image, text = latents(), torch.rand(B, 3, LATENT, LATENT), torch.randn(B, 5, 16)
    model.apply_model(z, timesteps(), {"c_concat": [image], "c_crossattn": [text]})
    ((x, context, y),) = calls
    assert torch.equal(x, torch.cat([z, image], dim=1)) and torch.equal(context, text) and y is None


def test_adm_gives_the_conditioning_as_class_input(unet_calls):
    model = tiny_model(
        "celeba256",
        "model.params.conditioning_key=adm",
        "model.params.cond_stage_config={target: torch.nn.Identity}",
        "model.params.unet_config.params.num_classes=10",
    )
    calls = unet_calls(model)
    labels = torch.tensor([1, 9])
    out = model.apply_model(latents(), timesteps(), labels)
    ((x, context, y),) = calls
    assert x.shape[1] == 3 and context is None and torch.equal(y, labels)
    # The label changes the prediction: y reaches the UNet's label embedding.
    assert not torch.allclose(out, model.apply_model(latents(), timesteps(), torch.tensor([2, 4])))


def test_unconditional_models_give_the_unet_nothing_but_the_latent(unet_calls):
    model = tiny_model("celeba256")
    assert model.model.conditioning_key is None and model.cond_stage_model is None
    calls = unet_calls(model)
    z, c = model.get_input({"image": torch.rand(B, IMAGE, IMAGE, 3) * 2 - 1}, "image")
    assert c is None and z.shape == (B, 3, LATENT, LATENT)
    model.apply_model(z, timesteps(), c)
    ((x, context, y),) = calls
    assert torch.equal(x, z) and context is None and y is None


def test_spatial_rescaler_halves_per_stage_and_maps_channels():
    rescaler = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)
    assert {k: tuple(v.shape) for k, v in rescaler.state_dict().items()} == {"channel_mapper.weight": (3, 182, 1, 1)}
    x = torch.rand(1, 182, 32, 24)
    out = rescaler.encode(x)
    expected = F.conv2d(
        F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear"),
        rescaler.channel_mapper.weight,
    )
    assert out.shape == (1, 3, 8, 6) and torch.allclose(out, expected)
    with_bias = SpatialRescaler(in_channels=4, out_channels=2, bias=True)
    assert set(with_bias.state_dict()) == {"channel_mapper.weight", "channel_mapper.bias"}
    assert SpatialRescaler(n_stages=1, method="nearest").state_dict() == {}
    assert torch.equal(SpatialRescaler(n_stages=0)(x), x)


# name, the raw conditioning of a batch (B, C, H, W) and how the model encodes it for the UNet's concat input
def _low_res(model):
    return model.get_learned_conditioning(torch.rand(B, 3, LATENT, LATENT) * 2 - 1)


def _segmentation(model):
    labels = torch.randint(0, 182, (B, IMAGE, IMAGE), generator=torch.Generator().manual_seed(1))
    return model.get_learned_conditioning(F.one_hot(labels, 182).permute(0, 3, 1, 2).float())


def _masked_image(model):
    image, mask = torch.rand(B, 3, IMAGE, IMAGE) * 2 - 1, torch.zeros(B, 1, IMAGE, IMAGE)
    mask[..., 4:12, 4:12] = 1.0
    c = model.get_learned_conditioning(image * (1 - mask))
    return torch.cat([c, F.interpolate(mask * 2 - 1, size=c.shape[-2:])], dim=1)


@pytest.mark.parametrize("sampler", ["ddim", "Euler"])
@pytest.mark.parametrize(
    "name, conditioning",
    [("bsr_sr", _low_res), ("semantic_synthesis256", _segmentation), ("inpainting_big", _masked_image)],
)
def test_image_conditioned_models_sample(name, conditioning, sampler):
    model = tiny_model(name)
    with torch.no_grad():
        c = conditioning(model)
        assert c.shape[-2:] == (LATENT, LATENT)
        assert c.shape[1] + model.channels == model.model.diffusion_model.in_channels

        def draw(cond):
            return sample(
                model, sampler, 3, cond, shape=(B, model.channels, LATENT, LATENT), noise=Noise([0, 1]), progress=False
            )

        z = draw(c)
        assert z.shape == (B, model.channels, LATENT, LATENT) and torch.isfinite(z).all()
        assert torch.equal(z, draw(c))  # seeded
        assert not torch.allclose(z, draw(torch.zeros_like(c)))  # the conditioning reaches the UNet
        assert model.decode_first_stage(z).shape == (B, 3, IMAGE, IMAGE)
