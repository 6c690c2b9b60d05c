"""CFG++ samplers, and the guided/unconditional estimate pair they need, on the analytic Gaussian model.

The conditioning shifts the data mean per sample (GaussianDataModel's ``cond``), so guidance has a known effect: here
the unconditional mean is 0.5 and the conditional ones 0.8 and 0.2 (a shift of +-0.3). Measured, as how far
guidance moves the samples' mean in units of that shift, over 20 / 50 Karras steps: Euler CFG++ at scale 0.25 0.89 /
2.11, at scale 1 3.58 / 8.45 (Euler with CFG moves it 0.95 per unit of scale at both step counts, so that is CFG at
about 3.7 / 8.9: a CFG++ step at scale ``l`` is a CFG step at ``l * sigma / (sigma - sigma_next)``); DPM++ 2M CFG++
1.17 / 2.34 and 4.66 / 9.37. So CFG++ takes scales near 1 and below, and its strength grows with the step count.
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic_model import GaussianDataModel
from test_sampling import STATS_SAMPLES, start_noise

from ldm.models.diffusion import sampling
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample

COND = torch.tensor([0.3, -0.3], dtype=torch.float64)
UNCOND = torch.zeros(2, dtype=torch.float64)
BASE = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral", "dpmpp_2m_cfg_pp": "dpmpp_2m"}
STOCHASTIC = {"euler_ancestral_cfg_pp", "euler_ancestral"}
SIGMA_MIN, SIGMA_MAX = GaussianDataModel().schedule.sigma_min, GaussianDataModel().schedule.sigma_max


class RecordingModel(GaussianDataModel):
    """The analytic model, recording the batch size of every ``apply_model`` call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batches: list[int] = []

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append(x_t.shape[0])
        return super().apply_model(x_t, t, cond)


def run(name: str, denoiser, steps: int = 8, seed: int = 7, x: torch.Tensor | None = None, **options) -> torch.Tensor:
    sigmas = sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
    x = start_noise() * sigmas[0] if x is None else x
    if name in STOCHASTIC:
        options["noise"] = Noise.from_seed(seed, len(x))
    return getattr(sampling, f"sample_{name}")(denoiser, x, sigmas, progress=False, **options)


def guided(
    scale: float, parameterization: str = "eps", cond: torch.Tensor = COND
) -> tuple[GaussianDataModel, Denoiser]:
    model = RecordingModel(parameterization=parameterization)
    return model, Denoiser(GuidedEps(model, cond, UNCOND[: len(cond)], scale))


# -- the estimate pair --


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_eps_with_uncond_is_one_batched_call(scale: float) -> None:
    model = RecordingModel()
    eps = GuidedEps(model, COND, UNCOND, scale)
    x = start_noise()
    guided_eps, uncond_eps = eps.with_uncond(x, 500)
    assert model.batches == [4]
    t = torch.tensor([500, 500])
    eps_u, eps_c = model.apply_model(x, t, UNCOND), model.apply_model(x, t, COND)
    torch.testing.assert_close(uncond_eps, eps_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(guided_eps, eps_u + scale * (eps_c - eps_u), rtol=0, atol=1e-12)
    model.batches = []
    plain = eps(x, 500)
    # The plain call skips the unconditional branch at scale 1.
    assert model.batches == ([2] if scale == 1.0 else [4])
    torch.testing.assert_close(plain, guided_eps, rtol=0, atol=1e-12)


def test_denoiser_with_uncond_keeps_the_known_region_and_matches_the_plain_call() -> None:
    model = GaussianDataModel()
    x0, mask = torch.full((2, 1, 4, 4), -0.3, dtype=torch.float64), torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    mask[..., :2] = 1.0
    denoiser = Denoiser(GuidedEps(model, COND, UNCOND, 2.0), mask, x0)
    x = start_noise() * 3.0
    denoised, uncond = denoiser.with_uncond(x, 3.0)
    assert torch.equal(denoised, denoiser(x, 3.0))
    assert torch.equal(denoised[..., :2], x0[..., :2]) and torch.equal(uncond[..., :2], x0[..., :2])
    assert not torch.equal(denoised[..., 2:], uncond[..., 2:])
    plain = Denoiser(GuidedEps(model))
    assert all(torch.equal(d, plain(x, 3.0)) for d in plain.with_uncond(x, 3.0))


# -- the base samplers, exactly --


@pytest.mark.parametrize("name", sorted(BASE))
def test_without_uncond_it_is_its_base_sampler(name: str) -> None:
    denoiser = Denoiser(GuidedEps(GaussianDataModel(), COND))
    assert torch.equal(run(name, denoiser), run(BASE[name], denoiser))
    model = GaussianDataModel()

    def consistency(x: torch.Tensor, sigma: float) -> torch.Tensor:  # a denoiser without with_uncond
        return model.exact_flow(x, sigma, 0.0)

    assert torch.equal(run(name, consistency), run(BASE[name], consistency))


@pytest.mark.parametrize("name", sorted(BASE))
def test_at_scale_zero_it_is_its_base_sampler_on_the_unconditional_model(name: str) -> None:
    _, denoiser = guided(0.0)
    unconditional = Denoiser(GuidedEps(GaussianDataModel(), UNCOND))
    torch.testing.assert_close(run(name, denoiser), run(BASE[name], unconditional), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "eta"), [("euler_cfg_pp", 0.0), ("euler_ancestral_cfg_pp", 1.0)])
@pytest.mark.parametrize("scale", [0.4, 1.0])
def test_euler_cfg_pp_is_cfg_at_a_per_step_scale(name: str, eta: float, scale: float) -> None:
    # Each step: the unconditional step plus the guidance vector at weight 1, where CFG gives it scale * (1 -
    # sigma_down / sigma); so CFG++ at scale l is CFG at l * sigma / (sigma - sigma_down) step by step.
    model, denoiser = guided(scale)
    sigmas = sampling.get_sigmas_karras(6, SIGMA_MIN, SIGMA_MAX)
    x = start_noise() * sigmas[0]
    expected, noise = x, Noise.from_seed(7, 2)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        sigma_down = sampling.core.ancestral_split(sigma, sigma_next, eta)[0]
        cfg = Denoiser(GuidedEps(model, COND, UNCOND, scale * sigma / (sigma - sigma_down)))
        step = torch.tensor([sigma, sigma_next], dtype=torch.float64)
        expected = sampling.sample_euler_ancestral(cfg, expected, step, eta=eta, noise=noise, progress=False)
    torch.testing.assert_close(run(name, denoiser, steps=6), expected, rtol=0, atol=1e-10)


# -- guidance --


def guidance_shift(name: str, scale: float, steps: int) -> torch.Tensor:
    """How far guidance moves the mean of the samples beyond where scale 0 leaves it, in units of the conditional
    shift (1 = the conditional mean's distance from the unconditional one), per sample. The samplers are affine in
    x here, so the mean of the samples is the run from x = 0."""
    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    out, base = (run(name, guided(s)[1], steps=steps, x=x).flatten() for s in (scale, 0.0))
    return (out - base) / COND


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_guidance_moves_the_mean_toward_the_conditional_one(name: str) -> None:
    # Measured at 20 steps, scale 0.1 / 0.2: Euler CFG++ 0.358 / 0.716, DPM++ 2M CFG++ 0.466 / 0.932; at 50 steps
    # and scale 0.2: 1.69 and 1.87. (Scale 0 itself ends 0.08 short of 0.5, the start noise's mean 0 times the 4.8%
    # of the gap the ODE keeps.)
    low, high = guidance_shift(name, 0.1, 20), guidance_shift(name, 0.2, 20)
    assert torch.all(low > 0) and torch.all(high < 1)
    torch.testing.assert_close(high, 2 * low, rtol=1e-9, atol=0)  # guidance is linear in the scale here
    assert torch.all(guidance_shift(name, 0.2, 50) > high)  # and grows with the step count


@pytest.mark.parametrize("steps", [400])
def test_euler_a_cfg_pp_samples_the_data_without_guidance(steps: int) -> None:
    # It is then Euler a: measured mean 0.4998 std 0.6975 (4 standard errors: 0.022, 0.015).
    model = GaussianDataModel()
    sigmas = sampling.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX)
    noise = Noise.from_seed(1234, 1)
    side = math.isqrt(STATS_SAMPLES)
    x = noise.randn((1, 1, side, side), dtype=torch.float64) * sigmas[0]
    out = sampling.sample_euler_ancestral_cfg_pp(Denoiser(GuidedEps(model)), x, sigmas, noise=noise, progress=False)
    assert float(out.mean()) == pytest.approx(model.mu, abs=4 * model.s / math.sqrt(STATS_SAMPLES))
    assert float(out.std()) == pytest.approx(model.s, abs=4 * model.s / math.sqrt(2 * STATS_SAMPLES))


def test_euler_a_cfg_pp_mean_is_its_noise_free_path() -> None:
    # The sampler is affine in its noise here, so the samples' mean is the run without noise (s_noise 0); the
    # guided mean moves from 0.5 toward 0.8: measured 0.6324 over 16384 samples against 0.6305 (std 0.654).
    _, denoiser = guided(0.1, cond=COND[:1])
    sigmas = sampling.get_sigmas_karras(50, SIGMA_MIN, SIGMA_MAX)
    noise = Noise.from_seed(1234, 1)
    side = math.isqrt(STATS_SAMPLES)
    x = noise.randn((1, 1, side, side), dtype=torch.float64) * sigmas[0]
    out = sampling.sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, noise=noise, progress=False)
    mean_path = sampling.sample_euler_ancestral_cfg_pp(denoiser, x * 0, sigmas, s_noise=0.0, progress=False)
    expected = float(mean_path.flatten()[0])
    assert 0.5 < expected < 0.8
    assert float(out.mean()) == pytest.approx(expected, abs=4 * float(out.std()) / math.sqrt(STATS_SAMPLES))


# -- calls, v and x0 models, the front end --


@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(BASE))
def test_one_batched_model_call_a_step(name: str, scale: float) -> None:
    model, denoiser = guided(scale)
    run(name, denoiser, steps=9)
    assert model.calls == 9 and model.batches == [4] * 9


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize("name", sorted(BASE))
def test_v_and_x0_models_sample_like_eps_models(name: str, parameterization: str) -> None:
    expected = run(name, guided(0.7)[1])
    torch.testing.assert_close(run(name, guided(0.7, parameterization)[1]), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("label", "base"), [("Euler CFG++", "Euler"), ("DPM++ 2M CFG++", "DPM++ 2M")])
def test_front_end_renoises_with_the_unconditional_estimate_even_at_scale_1(label: str, base: str) -> None:
    model = GaussianDataModel()
    x_T = start_noise()
    options = {"steps": 10, "x_T": x_T, "progress": False}
    assert torch.equal(sample(model, label, cond=COND, **options), sample(model, base, cond=COND, **options))
    guided_run = sample(model, label, cond=COND, uncond=UNCOND, scale=1.0, **options)
    assert not torch.allclose(guided_run, sample(model, base, cond=COND, uncond=UNCOND, scale=1.0, **options))
