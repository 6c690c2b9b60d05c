"""Variation seeds (A1111's subseed / subseed_strength) on the tiny model."""

import numpy as np
import pytest
import torch

from ldm.errors import UserError
from ldm.models.diffusion.noise import Noise, slerp
from ldm.outputs import parse_parameters
from ldm.request import GenerationRequest
from tests.feature_helpers import pixels

SETTINGS = {"steps": 3, "height": 16, "width": 16}


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, low, high), low) and torch.equal(slerp(1.0, low, high), high)
    # Along dim 1 (A1111's axis), vectors of one norm slerp to that norm, where a linear mix would shrink it.
    high = high / high.norm(dim=1, keepdim=True) * low.norm(dim=1, keepdim=True)
    middle = slerp(0.5, low, high)
    assert torch.allclose(middle.norm(dim=1), low.norm(dim=1), rtol=1e-4)
    assert (((low + high) / 2).norm(dim=1) < low.norm(dim=1) * 0.99).all()


def test_noise_first_draw_is_slerped_later_draws_are_the_seeds():
    plain, varied = Noise([3]), Noise([3], subseeds=[9], subseed_strength=1.0)
    assert torch.equal(varied.randn((1, 4, 4, 4)), Noise([9]).randn((1, 4, 4, 4)))
    plain.randn((1, 4, 4, 4))
    assert torch.equal(varied.randn((1, 4, 4, 4)), plain.randn((1, 4, 4, 4))), "ancestral noise: the seed's"


def test_request_follows_a1111_seed_and_subseed_rules():
    request = GenerationRequest("a", seed=5, subseed=20, subseed_strength=0.3, n=3)
    assert request.seeds == (5, 5, 5) and request.subseeds == (20, 21, 22)
    assert GenerationRequest("a", seed=5, subseed=20, n=3).seeds == (5, 6, 7)
    assert GenerationRequest("a", seed=5, subseed=20, n=3).subseeds is None
    drawn = GenerationRequest("a", seed=1, subseed_strength=0.5)
    assert drawn.subseeds is not None and GenerationRequest("a", seed=1, subseed=drawn.subseed, subseed_strength=0.5)
    with pytest.raises(UserError, match=r"subseed_strength must be a number in \[0, 1\]"):
        GenerationRequest("a", subseed_strength=1.5)
    with pytest.raises(UserError, match="2 subseeds for 3 images"):
        GenerationRequest("a", subseed=[1, 2], subseed_strength=0.5, n=3)


def test_strength_0_is_the_seeds_image_and_1_the_subseeds(pipe):
    seed_image = pipe.generate("a red circle", seed=4, **SETTINGS).images[0]
    subseed_image = pipe.generate("a red circle", seed=11, **SETTINGS).images[0]
    zero = pipe.generate("a red circle", seed=4, subseed=11, subseed_strength=0.0, **SETTINGS).images[0]
    one = pipe.generate("a red circle", seed=4, subseed=11, subseed_strength=1.0, **SETTINGS).images[0]
    half = pipe.generate("a red circle", seed=4, subseed=11, subseed_strength=0.5, **SETTINGS).images[0]
    assert np.array_equal(pixels(zero), pixels(seed_image))
    assert np.array_equal(pixels(one), pixels(subseed_image))  # DDIM, eta 0: the starting noise is all there is
    assert np.abs(pixels(half) - pixels(seed_image)).max() > 0 and np.abs(pixels(half) - pixels(one)).max() > 0


def test_a_variation_batch_equals_single_runs_and_writes_its_infotext(pipe):
    batch = pipe.generate("a", seed=4, subseed=30, subseed_strength=0.4, n=3, sampler="Euler a", **SETTINGS)
    assert batch.seeds == [4, 4, 4]
    for i in range(3):
        single = pipe.generate("a", seed=4, subseed=30 + i, subseed_strength=0.4, sampler="Euler a", **SETTINGS)
        assert np.abs(pixels(batch.images[i]) - pixels(single.images[0])).max() <= 1
        fields = parse_parameters(batch.parameters(i))
        assert fields["Seed"] == "4" and fields["Variation seed"] == str(30 + i)
        assert fields["Variation seed strength"] == "0.4"
    assert "Variation seed" not in parse_parameters(pipe.generate("a", seed=4, **SETTINGS).parameters(0))
