"""Restart and LCM sampling against closed-form answers for Gaussian data (see test_sampling.py).

Measured (16384 samples, Karras schedules; 4 standard errors: mean 0.022, std 0.015):

- Restart, 2 S - 1 model calls for S steps like Heun: 20 steps mean 0.4943 std 0.7109, 40 steps 0.4984 / 0.7051, 400
  steps 0.4984 / 0.6996. Below 20 steps it is Heun (19 steps: 0.4755 / 0.7170, the ODE's start-noise bias: it maps
  the start's mean 0 to 0.476; each restart shrinks that bias by the ODE's contraction from sigma 2 to 0.1).
- LCM, S calls: with the analytic model's exact denoiser (not a consistency model) each denoise-and-renoise step
  loses variance, and at many small steps the std settles near s / sqrt(2): expected 0.335, 0.477, 0.492 at 4, 50,
  400 steps, measured 0.335 (4 steps) and 0.4926 (400). With the exact consistency function (the ODE's solution to
  sigma 0) it samples the data: mean 0.4976 std 0.6969 at 4 steps, 0.4991 / 0.6995 at 400.
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic_model import GaussianDataModel
from test_sampling import STATS_SAMPLES, analytic_denoiser, sample_stats, start_noise

from ldm.models.diffusion import sampling
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.restart import restart_steps


def karras(steps: int) -> torch.Tensor:
    schedule = GaussianDataModel().schedule
    return sampling.get_sigmas_karras(steps, schedule.sigma_min, schedule.sigma_max)


def assert_stats(mean: float, std: float, expected_mean: float, expected_std: float) -> None:
    """Within 4 standard errors of the sample mean (std / sqrt(N)) and of the sample std (about std / sqrt(2N))."""
    assert mean == pytest.approx(expected_mean, abs=4 * expected_std / math.sqrt(STATS_SAMPLES))
    assert std == pytest.approx(expected_std, abs=4 * expected_std / math.sqrt(2 * STATS_SAMPLES))


# -- Restart --


@pytest.mark.parametrize("steps", [1, 5, 19, 20, 35, 36, 40, 50])
def test_restart_costs_what_heun_costs(steps: int) -> None:
    model, denoiser = analytic_denoiser()
    sigmas = karras(steps)
    seen = []
    x = start_noise() * sigmas[0]
    sampling.sample_restart(denoiser, x, sigmas, noise=Noise.from_seed(1, 2), callback=seen.append, progress=False)
    assert model.calls == 2 * steps - 1
    assert [step["i"] for step in seen] == list(range(steps))


@pytest.mark.parametrize(("steps", "main", "restarts"), [(20, 11, 1), (35, 26, 1), (36, 18, 2), (50, 26, 2)])
def test_restart_default_plan_is_a1111s(steps: int, main: int, restarts: int) -> None:
    # A1111: k = 9 Heun steps a restart (k = S // 4 and two restarts from 36 steps), from the main schedule's sigma
    # nearest 0.1 up to its sigma nearest 2.
    sigmas, plan = sampling.a1111_plan(karras(steps))
    assert len(sigmas) - 1 == main
    pairs = restart_steps(sigmas.tolist(), plan)
    jumps = [i for i in range(1, len(pairs)) if pairs[i][0] > pairs[i - 1][1]]
    assert len(pairs) == steps and len(jumps) == restarts
    main_sigmas = sigmas.tolist()
    assert all(pairs[i][0] == min(main_sigmas, key=lambda s: abs(s - 2.0)) for i in jumps)
    assert all(pairs[i - 1][1] == min(main_sigmas, key=lambda s: abs(s - 0.1)) for i in jumps)


@pytest.mark.parametrize("steps", [7, 19, 40])
def test_restart_without_restarts_is_heun(steps: int) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = karras(steps)
    x = start_noise() * sigmas[0]
    heun = sampling.sample_heun(denoiser, x, sigmas, progress=False)
    assert torch.equal(sampling.sample_restart(denoiser, x, sigmas, restart_list={}, progress=False), heun)
    assert torch.equal(
        sampling.sample_restart(denoiser, x, sigmas, restart_list={0.5: (3, 0, 2.0)}, progress=False), heun
    )
    if steps < 20:
        assert torch.equal(sampling.sample_restart(denoiser, x, sigmas, progress=False), heun)


@pytest.mark.parametrize("steps", [20, 40, 400])
def test_restart_reproduces_the_data_distribution(steps: int) -> None:
    model = GaussianDataModel()
    assert_stats(*sample_stats("restart", steps), model.mu, model.s)


def test_restart_bad_plans_are_clear_errors() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = karras(25)
    x = start_noise() * sigmas[0]
    for plan in ({0.1: (0, 1, 2.0)}, {0.1: (3, -1, 2.0)}, {2.0: (3, 1, 0.1)}):
        with pytest.raises(ValueError, match="restart_list entry"):
            sampling.sample_restart(denoiser, x, sigmas, restart_list=plan, progress=False)
    with pytest.raises(ValueError, match="schedules ending at sigma 0"):
        sampling.sample_restart(denoiser, x, sigmas[:-1], progress=False)


# -- LCM --


def lcm_expected(sigmas: list[float], gain) -> tuple[float, float]:
    """Mean and std of LCM's output from start noise N(0, sigmas[0]^2) with a denoiser ``mu + gain(sigma) (x - mu)``:
    each step scales the deviation from mu by the gain, then adds fresh noise of std sigma_next."""
    model = GaussianDataModel()
    mean, var = 0.0, sigmas[0] ** 2
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        c = gain(sigma)
        mean, var = model.mu + c * (mean - model.mu), c * c * var + sigma_next**2
    return mean, math.sqrt(var)


def lcm_stats(steps: int, denoiser) -> tuple[float, float]:
    sigmas = karras(steps)
    noise = Noise.from_seed(1234, 1)
    side = math.isqrt(STATS_SAMPLES)
    x = noise.randn((1, 1, side, side), dtype=torch.float64) * sigmas[0]
    out = sampling.sample_lcm(denoiser, x, sigmas, noise=noise, progress=False)
    return float(out.mean()), float(out.std())


@pytest.mark.parametrize("steps", [4, 400])
def test_lcm_with_an_ordinary_denoiser_follows_its_closed_form(steps: int) -> None:
    model, denoiser = analytic_denoiser()
    expected = lcm_expected(karras(steps).tolist(), lambda sigma: model.s**2 / (model.s**2 + sigma**2))
    assert expected[1] < 0.5  # far below the data's 0.7: LCM is for consistency models
    assert_stats(*lcm_stats(steps, denoiser), *expected)


@pytest.mark.parametrize("steps", [4, 400])
def test_lcm_with_a_consistency_function_samples_the_data(steps: int) -> None:
    model = GaussianDataModel()
    expected = lcm_expected(karras(steps).tolist(), lambda sigma: model.s / math.sqrt(model.s**2 + sigma**2))
    mean, std = lcm_stats(steps, lambda x, sigma: model.exact_flow(x, sigma, 0.0))
    assert_stats(mean, std, *expected)
    assert_stats(mean, std, model.mu, model.s)


@pytest.mark.parametrize("steps", [1, 2, 9])
def test_lcm_calls_the_model_once_a_step(steps: int) -> None:
    model, denoiser = analytic_denoiser()
    sigmas = karras(steps)
    sampling.sample_lcm(denoiser, start_noise() * sigmas[0], sigmas, noise=Noise.from_seed(3, 2), progress=False)
    assert model.calls == steps


# -- both: v and x0 models, no autograd graph --


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize(("name", "steps"), [("restart", 8), ("restart", 24), ("lcm", 8)])
def test_v_and_x0_models_sample_like_eps_models(name: str, steps: int, parameterization: str) -> None:
    results = []
    for param in ["eps", parameterization]:
        _, denoiser = analytic_denoiser(param)
        sigmas = karras(steps)
        run = getattr(sampling, f"sample_{name}")
        results.append(run(denoiser, start_noise() * sigmas[0], sigmas, noise=Noise.from_seed(7, 2), progress=False))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["restart", "lcm"])
def test_no_autograd_graph_when_called_directly(name: str) -> None:
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    sigmas = sampling.get_sigmas_karras(24, 0.03, 10.0)
    out = getattr(sampling, f"sample_{name}")(lambda x, sigma: x * weight, start_noise() * sigmas[0], sigmas)
    assert not out.requires_grad
