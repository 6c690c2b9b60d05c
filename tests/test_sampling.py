"""The k-diffusion samplers and DPMSolverSampler against closed-form answers for Gaussian data (no reference needed).

For data ``x0 ~ N(mu, s^2)`` the analytic model's predictions are exact, so a deterministic sampler's only error is
its discretization error: it must land on the exact probability-flow solution as the step count grows, at its
order's rate. Stochastic samplers must reproduce the data's mean and std. ``python tests/test_sampling.py`` prints
the measured figures.
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.models.diffusion import sampling
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.models.diffusion.schedules import dpm_solver_grid

DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m"]
STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde"]
# Max abs error allowed at HIGH_STEPS Karras steps for start noise of std 1 (about 2x the measured error).
HIGH_STEPS = 500
TOLERANCE = {"euler": 1.5e-2, "heun": 1e-4, "dpm_2": 1e-4, "lms": 1e-6, "dpmpp_2m": 1e-4}
ORDER_STEPS = [20, 40, 80, 160]
EXPECTED_ORDER = {"euler": 1.0, "heun": 2.0, "dpmpp_2m": 2.0}
STATS_STEPS, STATS_SAMPLES = 400, 16384


def sampler(name: str):
    return getattr(sampling, f"sample_{name}")


def analytic_denoiser(parameterization: str = "eps") -> tuple[GaussianDataModel, Denoiser]:
    model = GaussianDataModel(parameterization=parameterization)
    return model, Denoiser(GuidedEps(model))


def exact_result(model: GaussianDataModel, x: torch.Tensor, sigmas: torch.Tensor, name: str) -> torch.Tensor:
    """What a sampler converges to from ``x`` at ``sigmas[0]``.

    The exact ODE solution down to ``sigmas[-2]`` (the table's smallest sigma, ~0.029), then the last step: the
    one-step samplers and DPM++ 2M jump to the exact denoised estimate there, ``E[x0 | x] = mu + (x - mu) s^2 /
    (s^2 + sigma^2)``; LMS integrates its derivative polynomial across that step, i.e. follows the ODE to sigma 0.
    """
    if name == "lms":
        return model.exact_flow(x, float(sigmas[0]), 0.0)
    sigma = float(sigmas[-2])
    x_last = model.exact_flow(x, float(sigmas[0]), sigma)
    return model.mu + (x_last - model.mu) * model.s**2 / (model.s**2 + sigma**2)


def start_noise(shape: tuple[int, ...] = (2, 1, 4, 4), seed: int = 0) -> torch.Tensor:
    return Noise.from_seed(seed, shape[0]).randn(shape, dtype=torch.float64)


# -- figures (also printed by running this file) --


def max_error(name: str, steps: int) -> float:
    """Max abs error of a deterministic sampler at ``steps`` Karras steps, float64."""
    model, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    x = start_noise() * sigmas[0]
    out = sampler(name)(denoiser, x, sigmas, progress=False)
    return float((out - exact_result(model, x, sigmas, name)).abs().max())


def measured_order(name: str) -> float:
    """Slope of -log(error) against log(steps), least squares over ORDER_STEPS."""
    logs_n = torch.tensor([math.log(n) for n in ORDER_STEPS], dtype=torch.float64)
    logs_e = torch.tensor([math.log(max_error(name, n)) for n in ORDER_STEPS], dtype=torch.float64)
    dn = logs_n - logs_n.mean()
    return float(-(dn * (logs_e - logs_e.mean())).sum() / (dn * dn).sum())


def sample_stats(name: str, steps: int = STATS_STEPS, samples: int = STATS_SAMPLES, **options) -> tuple[float, float]:
    """Mean and std of ``samples`` values drawn by a stochastic sampler in ``steps`` Karras steps (with ``options``).

    The analytic model acts elementwise, so the elements of one (1, 1, H, W) sample are independent draws.
    """
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    side = int(math.isqrt(samples))
    noise = Noise.from_seed(1234, 1)
    x = noise.randn((1, 1, side, side), dtype=torch.float64) * sigmas[0]
    out = sampler(name)(denoiser, x, sigmas, noise=noise, progress=False, **options)
    return float(out.mean()), float(out.std())


# -- schedules --


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("n", [1, 2, 30])
def test_schedule_shape_endpoints_monotone(schedule: str, n: int) -> None:
    sigmas = getattr(sampling, f"get_sigmas_{schedule}")(n, 0.03, 14.6)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float64 and sigmas.device.type == "cpu"
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-1].item() == 0.0
    if n > 1:
        assert sigmas[-2].item() == pytest.approx(0.03)
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_discrete_schedule_is_the_models_table() -> None:
    model = GaussianDataModel()
    sigmas = sampling.get_sigmas_discrete(4, model.schedule)
    table = model.schedule.sigmas
    expected = torch.stack([table[999], table[666], table[333], table[0], torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(sigmas, expected)


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        sampling.get_sigmas_karras(0, 0.03, 14.6)
    with pytest.raises(ValueError, match="sigma_min"):
        sampling.get_sigmas_exponential(10, 1.0, 0.5)
    _, denoiser = analytic_denoiser()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling.sample_euler(denoiser, torch.zeros(1, 1), torch.tensor([1.0, 2.0, 0.0]), progress=False)
    with pytest.raises(ValueError, match="eta"):
        sigmas = torch.tensor([1.0, 0.5, 0.0])
        sampling.sample_euler_ancestral(denoiser, torch.zeros(1, 1), sigmas, eta=-1.0, progress=False)


# -- deterministic samplers: convergence to the exact solution, and its order --


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_lands_on_exact_solution(name: str) -> None:
    assert max_error(name, HIGH_STEPS) < TOLERANCE[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_ORDER))
def test_convergence_order(name: str) -> None:
    assert measured_order(name) == pytest.approx(EXPECTED_ORDER[name], abs=0.3)


# -- stochastic samplers: the data distribution --


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_reproduces_data_distribution(name: str) -> None:
    # 4 standard errors of the sample mean (s / sqrt(N)) and of the sample std (about s / sqrt(2N)).
    model = GaussianDataModel()
    mean, std = sample_stats(name)
    assert mean == pytest.approx(model.mu, abs=4 * model.s / math.sqrt(STATS_SAMPLES))
    assert std == pytest.approx(model.s, abs=4 * model.s / math.sqrt(2 * STATS_SAMPLES))


def test_callback_sees_every_step() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(5, denoiser.sigma_min, denoiser.sigma_max)
    seen = []
    sampling.sample_dpmpp_2m(denoiser, start_noise() * sigmas[0], sigmas, callback=seen.append, progress=False)
    assert [step["i"] for step in seen] == list(range(5))
    assert [step["sigma"] for step in seen] == sigmas[:-1].tolist()
    assert seen[-1]["denoised"].shape == (2, 1, 4, 4)


# -- every sampler: v and x0 models, per-sample noise --


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_v_and_x0_models_sample_like_eps_models(name: str, parameterization: str) -> None:
    results = []
    for param in ["eps", parameterization]:
        _, denoiser = analytic_denoiser(param)
        sigmas = sampling.get_sigmas_karras(8, denoiser.sigma_min, denoiser.sigma_max)
        kwargs = {"noise": Noise.from_seed(7, 2)} if name in STOCHASTIC else {}
        results.append(sampler(name)(denoiser, start_noise() * sigmas[0], sigmas, progress=False, **kwargs))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_batch_sample_equals_single_run_with_its_seed(name: str) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(6, denoiser.sigma_min, denoiser.sigma_max)

    def run(seed: int, batch: int) -> torch.Tensor:
        noise = Noise.from_seed(seed, batch)
        x = noise.randn((batch, 1, 4, 4), dtype=torch.float64) * sigmas[0]
        return sampler(name)(denoiser, x, sigmas, noise=noise, progress=False)

    batch = run(10, 3)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], run(10 + i, 1), rtol=0, atol=0)


# -- DPMSolverSampler --


def dpm_solver_error(parameterization: str = "eps", steps: int = 50) -> float:
    """Max abs error of DPMSolverSampler on the analytic model against the exact flow to the grid's end, float64."""
    model = GaussianDataModel(parameterization=parameterization)
    x_T = start_noise()
    samples, intermediates = DPMSolverSampler(model).sample(steps, 2, (1, 4, 4), x_T=x_T, verbose=False)
    assert intermediates is None
    sigmas, _ = dpm_solver_grid(model.schedule, steps)
    x = x_T * math.sqrt(1 + sigmas[0] ** 2)
    exact = model.exact_flow(x, sigmas[0], sigmas[-1]) / math.sqrt(1 + sigmas[-1] ** 2)  # x_t at the end, as returned
    return float((samples - exact).abs().max())


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpm_solver_converges_to_exact_solution(parameterization: str) -> None:
    # Time-uniform steps are large in log-sigma near t = 1/N, which dominates the error: measured 4.5e-3 at 200 steps
    # and 2.4e-4 at 1000, about second order there (0.13 at 10).
    assert dpm_solver_error(parameterization, 200) < 7e-3
    assert dpm_solver_error(parameterization, 1000) < 4e-4


def original_dpm_solver(model: GaussianDataModel, x_t: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """The original DPM-Solver++ 2M run, from its published update rules in the VP variables (x_t, alpha_t = sqrt of
    alpha_cumprod, sigma_t, lambda_t = log(alpha_t / sigma_t)), written out independently: (result, model calls)."""
    log_alphas = 0.5 * model.alphas_cumprod.log()
    n = len(log_alphas)

    def log_alpha(t: float) -> float:  # piecewise linear through the points ((i + 1) / n, log_alphas[i])
        position = t * n - 1
        low = min(max(math.floor(position), 0), n - 2)
        return float(log_alphas[low] + (position - low) * (log_alphas[low + 1] - log_alphas[low]))

    def data_prediction(x: torch.Tensor, t: float) -> torch.Tensor:
        alpha = math.exp(log_alpha(t))
        sigma = math.sqrt(1 - alpha**2)
        t_input = torch.full((x.shape[0],), (t - 1 / n) * 1000.0, dtype=torch.float64)
        out = model.apply_model(x, t_input)
        noise = out if model.parameterization == "eps" else alpha * out + sigma * x
        return (x - sigma * noise) / alpha

    def lam(t: float) -> float:
        return log_alpha(t) - 0.5 * math.log(1 - math.exp(2 * log_alpha(t)))

    times = torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64).tolist()
    calls, previous = 1, [(times[0], data_prediction(x_t, times[0]))]
    for step in range(1, steps + 1):
        s, t = previous[-1][0], times[step]
        alpha_t, h = math.exp(log_alpha(t)), lam(t) - lam(s)
        ratio = math.sqrt(1 - alpha_t**2) / math.sqrt(1 - math.exp(2 * log_alpha(s)))
        order = 1 if step == 1 or (steps < 15 and step == steps) else 2
        m0 = previous[-1][1]
        if order == 1:
            x_t = ratio * x_t - alpha_t * math.expm1(-h) * m0
        else:
            r0 = (lam(s) - lam(previous[-2][0])) / h
            d1 = (m0 - previous[-2][1]) / r0
            x_t = ratio * x_t - alpha_t * math.expm1(-h) * m0 - 0.5 * alpha_t * math.expm1(-h) * d1
        if step < steps:
            previous = [*previous[-1:], (t, data_prediction(x_t, t))]
            calls += 1
    return x_t, calls


@pytest.mark.parametrize("steps", [2, 10, 14, 15, 25])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpm_solver_matches_the_original_algorithm(steps: int, parameterization: str) -> None:
    model = GaussianDataModel(parameterization=parameterization)
    x_T = start_noise()
    expected, calls = original_dpm_solver(model, x_T, steps)
    model.calls = 0
    samples, _ = DPMSolverSampler(model).sample(steps, 2, (1, 4, 4), x_T=x_T, verbose=False)
    assert model.calls == calls == steps
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-10)
    front_end = sample(model, "DPM-Solver++", steps=steps, x_T=x_T, progress=False)  # the scripts' --dpm_solver
    torch.testing.assert_close(front_end, expected, rtol=0, atol=1e-10)


def test_dpm_solver_guidance_and_callbacks() -> None:
    # eps is affine in the data mean, so guidance with per-sample offsets c (cond) and u (uncond) at scale g samples a
    # model whose mean is mu + u + g (c - u).
    cond, uncond, scale = (
        torch.tensor([0.3, -0.2], dtype=torch.float64),
        torch.tensor([0.1, 0.1], dtype=torch.float64),
        3.0,
    )
    steps, img_steps = [], []
    guided, _ = DPMSolverSampler(GaussianDataModel()).sample(
        10,
        2,
        (1, 4, 4),
        conditioning=cond,
        unconditional_conditioning=uncond,
        unconditional_guidance_scale=scale,
        x_T=start_noise(),
        verbose=False,
        callback=steps.append,
        img_callback=lambda x0, i: img_steps.append(i),
    )
    assert steps == img_steps == list(range(10))
    for i in range(2):
        shifted = GaussianDataModel(mu=0.5 + float(uncond[i] + scale * (cond[i] - uncond[i])))
        expected, _ = DPMSolverSampler(shifted).sample(10, 1, (1, 4, 4), x_T=start_noise()[i : i + 1], verbose=False)
        torch.testing.assert_close(guided[i : i + 1], expected, rtol=1e-9, atol=1e-9)


def test_dpm_solver_noise_argument_and_float32() -> None:
    samples, _ = DPMSolverSampler(GaussianDataModel()).sample(
        5, 2, (1, 4, 4), noise=Noise.from_seed(3, 2), verbose=False
    )
    x_T = Noise.from_seed(3, 2).randn((2, 1, 4, 4))
    expected, _ = DPMSolverSampler(GaussianDataModel()).sample(5, 2, (1, 4, 4), x_T=x_T, verbose=False)
    assert samples.dtype == torch.float32
    torch.testing.assert_close(samples, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"S": 0}, "S"),
        ({"S": 1001}, "S"),
        ({"x_T": torch.zeros(3, 1, 4, 4)}, "x_T"),
        ({"score_corrector": object()}, "score_corrector"),
        ({"quantize_x0": True}, "quantize_x0"),
        ({"temperature": 0.5}, "temperature"),
        ({"noise_dropout": 0.1}, "noise_dropout"),
        ({"eta": -1.0}, "eta"),
        ({"dynamic_threshold": 0.9}, "dynamic_threshold"),
        ({"mask": torch.ones(2, 1, 4, 4)}, "mask"),
    ],
)
def test_dpm_solver_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"S": 10, "batch_size": 2, "shape": (1, 4, 4), "verbose": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        DPMSolverSampler(GaussianDataModel()).sample(**args)


def test_dpm_solver_accepts_s_from_1_to_num_timesteps() -> None:
    sampler_ = DPMSolverSampler(GaussianDataModel(timesteps=50))
    for steps in (1, 7, 50):
        samples, _ = sampler_.sample(steps, 1, (1, 2, 2), x_T=start_noise((1, 1, 2, 2)), verbose=False)
        assert samples.shape == (1, 1, 2, 2) and torch.isfinite(samples).all()


if __name__ == "__main__":
    print(f"max abs error at {HIGH_STEPS} Karras steps (float64, start noise std 1):")
    for name in DETERMINISTIC:
        print(f"  {name:20s} {max_error(name, HIGH_STEPS):.2e}")
    print(f"measured convergence order over {ORDER_STEPS} Karras steps:")
    for name in DETERMINISTIC:
        print(f"  {name:20s} {measured_order(name):.2f}")
    model = GaussianDataModel()
    print(f"sample mean/std over {STATS_SAMPLES} samples (data: mean {model.mu}, std {model.s}):")
    for steps in (50, STATS_STEPS):
        for name in STOCHASTIC:
            mean, std = sample_stats(name, steps)
            print(f"  {name:20s} {steps:4d} steps  mean {mean:.4f}  std {std:.4f}")
    for param in ("eps", "v"):
        print(
            f"DPMSolverSampler ({param}) max abs error: 20 steps {dpm_solver_error(param, 20):.2e}, "
            f"200 steps {dpm_solver_error(param, 200):.2e}, 1000 steps {dpm_solver_error(param, 1000):.2e}"
        )


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_samplers_build_no_autograd_graph_when_called_directly(name: str) -> None:
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    sigmas = sampling.get_sigmas_karras(4, 0.03, 10.0).double()
    out = sampler(name)(lambda x, sigma: x * weight, start_noise() * sigmas[0], sigmas, progress=False)
    assert not out.requires_grad
