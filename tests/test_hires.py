"""The hires fix (ldm.hires) on the tiny model: f = 2, sides multiples of 4."""

import numpy as np
import pytest
import torch

from ldm.conversions import tensor_to_images
from ldm.errors import UserError
from ldm.hires import UPSCALERS, hires_size, upscale_latents
from ldm.outputs import parse_parameters
from ldm.request import GenerationRequest
from tests.feature_helpers import pixels

FIRST = {"steps": 3, "height": 16, "width": 12, "seed": 7}


def test_sizes_round_down_to_the_models_multiple():
    assert hires_size(512, 768, 1.5, 64) == (768, 1152)
    assert hires_size(512, 512, 1.3, 64) == (640, 640)  # 665.6 -> 640
    assert hires_size(16, 12, 2, 4) == (32, 24)


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Lanczos"])
def test_output_is_the_upscaled_size_and_the_infotext_the_first_passs(pipe, upscaler):
    result = pipe.generate("a red circle", enable_hr=True, hr_scale=2, hr_upscaler=upscaler, **FIRST)
    assert result.images[0].size == (24, 32)
    fields = parse_parameters(result.parameters(0))
    assert fields["Size"] == "12x16" and fields["Hires upscale"] == "2" and fields["Hires upscaler"] == upscaler
    assert fields["Denoising strength"] == "0.7" and fields["Steps"] == "3" and "Hires steps" not in fields


def test_strength_0_decodes_the_upscaled_first_pass_exactly(pipe):
    first = pipe.generate("a red circle", **FIRST)
    latents = upscale_latents(first.latents, "Latent", (16, 12))
    expected = tensor_to_images(pipe._decode(latents))[0]
    fixed = pipe.generate("a red circle", enable_hr=True, denoising_strength=0.0, **FIRST)
    assert np.array_equal(pixels(fixed.images[0]), pixels(expected))


def test_the_second_pass_runs_its_own_steps_and_changes_the_image(pipe):
    steps = []
    fixed = pipe.generate("a red circle", enable_hr=True, denoising_strength=0.0, **FIRST)
    redrawn = pipe.generate(
        "a red circle", enable_hr=True, denoising_strength=0.5, hr_second_pass_steps=8,
        callback=lambda i, x: steps.append(x.shape), **FIRST,
    )  # fmt: skip
    first_pass = [s for s in steps if s[-2:] == (8, 6)]
    second_pass = [s for s in steps if s[-2:] == (16, 12)]
    assert len(first_pass) == 3 and len(second_pass) == 4  # half of 8 steps
    assert np.abs(pixels(redrawn.images[0]) - pixels(fixed.images[0])).max() > 0
    assert parse_parameters(redrawn.parameters(0))["Hires steps"] == "8"


def test_a_hires_batch_equals_single_runs(pipe):
    settings = {**FIRST, "seed": 3, "enable_hr": True, "denoising_strength": 0.6, "sampler": "Euler a"}
    batch = pipe.generate("a", n=2, **settings)
    for i in range(2):
        single = pipe.generate("a", **{**settings, "seed": 3 + i})
        assert np.abs(pixels(batch.images[i]) - pixels(single.images[0])).max() <= 1


def test_bad_settings_name_the_valid_ones():
    with pytest.raises(UserError, match="unknown hr_upscaler 'ESRGAN'; choose one of: Latent, .*Lanczos, Nearest"):
        GenerationRequest("a", enable_hr=True, hr_upscaler="ESRGAN")
    with pytest.raises(UserError, match="hr_scale must be a number of at least 1"):
        GenerationRequest("a", enable_hr=True, hr_scale=0.5)
    with pytest.raises(UserError, match=r"denoising_strength must be a number in \[0, 1\]"):
        GenerationRequest("a", enable_hr=True, denoising_strength=2)
    for upscaler in UPSCALERS:  # every latent upscaler resizes to the asked size
        if upscaler.startswith("Latent"):
            assert upscale_latents(torch.zeros(1, 4, 8, 6), upscaler, (13, 9)).shape == (1, 4, 13, 9)
