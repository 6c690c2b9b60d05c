"""Splitting one sampling run: the ``start``/``end`` share of the grid and the in-loop hand-off to a second model."""

import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.errors import UserError
from ldm.models.diffusion.handoff import Handoff
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import SAMPLERS, sample, split_index

ALL = list(SAMPLERS)
FIXED_STEPS = [k for k, spec in SAMPLERS.items() if spec.fixed_steps]
# Samplers whose step depends only on the current x and sigma (and the noise drawn), not on earlier estimates.
MEMORYLESS = ["ddim", "ddpm", "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral",
              "dpmpp_sde", "dpmpp_2s", "dpmpp_3s", "restart", "lcm", "euler_cfg_pp",
              "euler_ancestral_cfg_pp"]  # fmt: skip
KW = {"steps": 10, "shape": (2, 1, 2, 2), "progress": False}


@pytest.fixture(scope="module")
def exact():
    return GaussianDataModel(mu=0.5, s=0.7)


def _split(model, name, seed, shape=(2, 1, 2, 2), switch=0.8):
    noise = Noise.from_seed(seed, shape[0])
    options = {**KW, "shape": shape}
    first = sample(model, name, noise=noise, end=switch, **options)
    return sample(model, name, noise=noise, x_T=first, start=switch, **options)


@pytest.mark.parametrize("name", MEMORYLESS)
def test_run_to_0_8_then_from_0_8_equals_one_run(exact, name):
    full = sample(exact, name, noise=Noise.from_seed(5, 2), **KW)
    torch.testing.assert_close(_split(exact, name, 5), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_handing_off_to_the_same_model_equals_one_run_for_every_sampler(exact, name):
    # DPM++ 2M, LMS, UniPC ... keep their history across the switch: the hand-off is one loop, as A1111's refiner.
    full = sample(exact, name, noise=Noise.from_seed(5, 2), **KW)
    same = Handoff(exact, None, None, switch=0.8)
    torch.testing.assert_close(sample(exact, name, noise=Noise.from_seed(5, 2), handoff=same, **KW), full)


@pytest.mark.parametrize("name", ["dpmpp_2m", "lms", "uni_pc"])
def test_multistep_samplers_restart_their_history_at_start(exact, name):
    # The two-call split (diffusers' denoising_end/start) makes the first step after the split of lower order:
    # a different but still converged sample.
    full = sample(exact, name, noise=Noise.from_seed(5, 2), **{**KW, "steps": 40})
    noise = Noise.from_seed(5, 2)
    first = sample(exact, name, noise=noise, end=0.8, **{**KW, "steps": 40})
    split = sample(exact, name, noise=noise, x_T=first, start=0.8, **{**KW, "steps": 40})
    assert not torch.equal(split, full)
    torch.testing.assert_close(split, full, atol=5e-2, rtol=0)


@pytest.mark.parametrize("name", FIXED_STEPS)
def test_split_batch_of_three_equals_three_single_split_runs(exact, name):
    batch = _split(exact, name, 11, shape=(3, 1, 2, 2))
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], _split(exact, name, 11 + i, shape=(1, 1, 2, 2)))


@pytest.mark.parametrize("name, steps", [("euler", 10), ("dpmpp_2m", 25), ("ddim", 7), ("dpm_2", 9)])
def test_the_two_parts_make_the_model_calls_of_one_run(name, steps):
    model = GaussianDataModel()
    sample(model, name, steps=steps, shape=(1, 1, 2, 2), noise=Noise([0]), progress=False)
    one_run, model.calls = model.calls, 0
    first = sample(model, name, steps=steps, shape=(1, 1, 2, 2), noise=Noise([0]), end=0.8, progress=False)
    first_calls = model.calls
    sample(model, name, steps=steps, x_T=first, noise=Noise([0]), start=0.8, progress=False)
    assert model.calls == one_run and 0 < first_calls < one_run


def test_the_second_model_takes_over_at_the_switch_step():
    base, refiner = GaussianDataModel(), GaussianDataModel()
    sample(base, "euler", steps=10, shape=(1, 1, 2, 2), noise=Noise([0]), handoff=Handoff(refiner, None, None, 0.75),
           progress=False)  # fmt: skip
    # A1111 switches at the first step i >= 0.75 * 10: steps 0..7 on the base, 8 and 9 on the refiner.
    assert (base.calls, refiner.calls) == (8, 2)


def test_img2img_switches_at_a_share_of_the_steps_it_runs():
    base, refiner = GaussianDataModel(), GaussianDataModel()
    init = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    sample(base, "euler", steps=10, init_latent=init, strength=0.5, noise=Noise([0]),
           handoff=Handoff(refiner, None, None, 0.5), progress=False)  # fmt: skip
    # A1111 runs int(0.5 * 10) + 1 = 6 steps, and hands over at step ceil(0.5 * 6) = 3 of them.
    assert (base.calls, refiner.calls) == (3, 3)


def test_split_index_follows_a1111():
    assert [split_index(f, 20) for f in (0.0, 0.8, 0.81, 1.0)] == [0, 16, 17, 20]
    assert split_index(0.7, 10) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start": 0.8}, "give x_T"),
        ({"end": 0.0}, "0 <= start < end <= 1"),
        ({"start": 0.9, "end": 0.5, "x_T": torch.zeros(1, 1, 2, 2)}, "0 <= start < end <= 1"),
        ({"handoff": Handoff(GaussianDataModel(), None, None, 0.0)}, "refiner switch"),
        ({"handoff": Handoff(GaussianDataModel(timesteps=500), None, None, 0.8)}, "noise schedule"),
    ],
)
def test_bad_splits_are_clear_errors(exact, kwargs, message):
    with pytest.raises(UserError, match=message):
        sample(exact, "euler", steps=10, shape=(1, 1, 2, 2), progress=False, **kwargs)


@pytest.mark.parametrize("sampler, changes", [("euler", [True, False]), ("restart", None)])
def test_the_handoff_reports_each_change_of_the_model_in_charge(exact, sampler, changes):
    """``Handoff.on_change`` sees every change of the model in charge and ends with the first model's; Restart's
    jumps back up the grid give charge back to the first model and then to the second again."""
    seen: list[bool] = []
    handoff = Handoff(exact, None, None, 0.6, on_change=seen.append)
    sample(exact, sampler, handoff=handoff, **KW)
    assert seen[0] is True and seen[-1] is False
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False)), "only changes are reported"
    if changes is not None:
        assert seen == changes
