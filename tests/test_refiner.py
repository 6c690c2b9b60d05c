"""SDXL base -> refiner through the Pipeline, on the tiny SDXL-shaped base and refiner (tests/sdxl_model.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_model import tiny_config

from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.outputs import parse_parameters
from ldm.refiner import attach_refiner
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.util import instantiate_from_config

SETTINGS = {"steps": 5, "scale": 4.0, "progress": False}


def _pipeline(refiner: bool, seed: int) -> Pipeline:
    torch.manual_seed(seed)
    config = tiny_config(refiner=refiner)
    model = instantiate_from_config(config.model).eval()
    with torch.no_grad():  # the UNet's zero-initialised output layers would make every model predict eps = 0
        for parameter in model.model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return Pipeline(model, LatentGeometry.from_config(config), RuntimeOptions("cpu", "full"))


@pytest.fixture(scope="module")
def pair() -> tuple[Pipeline, Pipeline]:
    return _pipeline(False, 0), _pipeline(True, 1)


def _counting(model: torch.nn.Module) -> list[int]:
    calls = [0]
    apply = model.apply_model

    def counted(*args, **kwargs):
        calls[0] += 1
        return apply(*args, **kwargs)

    model.apply_model = counted
    return calls


def _pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in result.images]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_the_refiner_runs_the_last_fifth_with_its_own_conditioning(pair, sampler):
    base, refiner = pair
    plain = base.generate("a red circle", seed=3, sampler=sampler, **SETTINGS)
    attach_refiner(base, refiner)
    try:
        base_calls, refiner_calls = _counting(base.model), _counting(refiner.model)
        refined = base.generate("a red circle", seed=3, sampler=sampler, **SETTINGS)
    finally:
        attach_refiner(base, None)
        del base.model.apply_model, refiner.model.apply_model
    # ceil(0.8 * 5) = 4 steps on the base, 1 on the refiner; both guided: one batched call per step.
    assert (base_calls[0], refiner_calls[0]) == (4, 1)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_pixels(refined), _pixels(plain), strict=True))
    fields = parse_parameters(refined.parameters(0))
    assert fields["Refiner switch at"] == "0.8" and fields["Refiner"] == "SDXLDiffusion"
    assert "Refiner" not in parse_parameters(plain.parameters(0))


def test_switch_at_one_is_the_base_alone(pair):
    base, refiner = pair
    plain = base.generate("a red circle", seed=3, sampler="euler", **SETTINGS)
    attach_refiner(base, refiner)
    try:
        whole = base.generate("a red circle", seed=3, sampler="euler", refiner_switch=1.0, **SETTINGS)
    finally:
        attach_refiner(base, None)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(whole), _pixels(plain), strict=True))


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_a_refined_batch_equals_single_refined_runs(pair, sampler):
    base, refiner = pair
    attach_refiner(base, refiner)
    try:
        batch = base.generate(["a red circle", "a blue square"], seed=7, sampler=sampler, **SETTINGS)
        singles = [
            base.generate(prompt, seed=7 + i, sampler=sampler, **SETTINGS)
            for i, prompt in enumerate(["a red circle", "a blue square"])
        ]
    finally:
        attach_refiner(base, None)
    for i, single in enumerate(singles):
        assert np.abs(_pixels(batch)[i] - _pixels(single)[0]).max() <= 1  # rounding to 8 bits


def test_a_refiner_of_another_latent_space_or_kind_is_refused(pair):
    base, _ = pair
    config = tiny_config(refiner=True)
    config.model.params.channels = 8
    config.model.params.first_stage_config.params.ddconfig.z_channels = 8
    config.model.params.first_stage_config.params.embed_dim = 8
    config.model.params.unet_config.params.in_channels = config.model.params.unet_config.params.out_channels = 8
    other = Pipeline(
        instantiate_from_config(config.model).eval(), LatentGeometry.from_config(config), RuntimeOptions("cpu", "full")
    )
    with pytest.raises(UserError, match="matching pair"):
        attach_refiner(base, other)
    assert base.refiner is None


@pytest.mark.parametrize("switch", [0.0, 1.5, "0.8", True])
def test_the_switch_is_checked_with_the_request(switch):
    with pytest.raises(UserError, match="refiner switch"):
        GenerationRequest("a red circle", refiner_switch=switch)
