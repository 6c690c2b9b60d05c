"""UniPC, DEIS, iPNDM, iPNDM_v, DPM++ 2M SDE Heun and DPM++ 3M SDE against closed-form answers for Gaussian data.

The harness of :mod:`test_sampling`: the analytic model's predictions are exact, so a deterministic sampler's only
error is its discretization error, and a stochastic one must reproduce the data's mean and std. The SDE samplers
with ``eta = 0`` are their deterministic multistep ODE solvers. ``python tests/test_sampling_multistep.py`` prints
the figures; measured in float64 on Karras steps from start noise of std 1:

    sampler               max abs error at 500 steps    order over 20/40/80/160 steps
    uni_pc                1.6e-08                       4.59
    uni_pc_bh2            9.8e-09                       4.77
    deis                  4.8e-07                       2.96
    ipndm                 8.8e-06                       2.09
    ipndm_v               1.6e-07                       3.64
    2m_sde_heun, eta 0    3.7e-05                       2.12
    3m_sde, eta 0         7.2e-06                       1.74 (1.90 over 40/80/160/320)
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from analytic_model import GaussianDataModel
from test_sampling import STATS_SAMPLES, analytic_denoiser, exact_result, sample_stats, start_noise

from ldm.models.diffusion import sampling
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import resolve_sampler
from ldm.models.diffusion.sampling.core import lagrange_weights
from ldm.models.diffusion.sampling.multistep import DEIS_QUADRATURE_POINTS, VP_BETA_D, VP_BETA_MIN, vp_time
from ldm.models.diffusion.schedules import append_zero, get_sigmas

DETERMINISTIC = {
    "uni_pc": sampling.sample_uni_pc,
    "uni_pc_bh2": sampling.sample_uni_pc_bh2,
    "deis": sampling.sample_deis,
    "ipndm": sampling.sample_ipndm,
    "ipndm_v": sampling.sample_ipndm_v,
    "2m_sde_heun_eta0": partial(sampling.sample_dpmpp_2m_sde_heun, eta=0.0),
    "3m_sde_eta0": partial(sampling.sample_dpmpp_3m_sde, eta=0.0),
}
STOCHASTIC = {"dpmpp_2m_sde_heun": sampling.sample_dpmpp_2m_sde_heun, "dpmpp_3m_sde": sampling.sample_dpmpp_3m_sde}
ALL = {**DETERMINISTIC, **STOCHASTIC}
HIGH_STEPS = 500
# About 2x the max abs error measured at HIGH_STEPS (see the table above).
TOLERANCE = {
    "uni_pc": 3e-8,
    "uni_pc_bh2": 2e-8,
    "deis": 1e-6,
    "ipndm": 2e-5,
    "ipndm_v": 3e-7,
    "2m_sde_heun_eta0": 8e-5,
    "3m_sde_eta0": 1.5e-5,
}
ORDER_STEPS = [20, 40, 80, 160]


def max_error(sample_fn, steps: int) -> float:
    """Max abs error of a deterministic sampler at ``steps`` Karras steps, float64. All of these take the last step
    to sigma 0 as the first-order step, so they converge to the exact flow to the smallest sigma, then its denoised
    estimate (:func:`test_sampling.exact_result`)."""
    model, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    x = start_noise() * sigmas[0]
    out = sample_fn(denoiser, x, sigmas, progress=False)
    return float((out - exact_result(model, x, sigmas, "denoised")).abs().max())


def measured_order(sample_fn, steps: list[int]) -> float:
    """Slope of -log(error) against log(steps), least squares."""
    logs_n = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    logs_e = torch.tensor([math.log(max_error(sample_fn, n)) for n in steps], dtype=torch.float64)
    dn = logs_n - logs_n.mean()
    return float(-(dn * (logs_e - logs_e.mean())).sum() / (dn * dn).sum())


def run(
    name: str, parameterization: str = "eps", steps: int = 8, seed: int = 7
) -> tuple[GaussianDataModel, torch.Tensor]:
    """(the model, with its call count, and the sample) for ``steps`` Karras steps from seeded start noise."""
    model, denoiser = analytic_denoiser(parameterization)
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    noise = Noise.from_seed(seed, 2)
    x = noise.randn((2, 1, 4, 4), dtype=torch.float64) * sigmas[0]
    return model, ALL[name](denoiser, x, sigmas, noise=noise, progress=False)


# -- deterministic: the exact solution, and the order of convergence --


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_sampler_lands_on_exact_solution(name: str) -> None:
    assert max_error(DETERMINISTIC[name], HIGH_STEPS) < TOLERANCE[name]


@pytest.mark.parametrize(
    ("name", "expected", "tolerance", "steps"),
    [
        # Exponential integrator on the eps polynomial of order 3: measured 2.96.
        ("deis", 3.0, 0.3, ORDER_STEPS),
        # Adams-Bashforth's equal-step weights on Karras's unequal steps are second order: measured 2.09.
        ("ipndm", 2.0, 0.3, ORDER_STEPS),
        # Variable-step Adams-Bashforth 4, measured 3.64: the Euler, AB2 and AB3 start steps leave errors of lower
        # order that are still comparable here (3.80 over these steps when the start is exact; 2.6 at 320-640).
        ("ipndm_v", 4.0, 0.5, ORDER_STEPS),
        ("2m_sde_heun_eta0", 2.0, 0.3, ORDER_STEPS),
        # k-diffusion's 3M weights its second difference by half what the exponential integrator needs, which makes
        # it second order; measured 1.74 over 20..160 steps, still approaching 2 (1.47, 1.81, 1.92 pairwise), 1.90
        # here. The doubled weight measures 2.9 (third order).
        ("3m_sde_eta0", 2.0, 0.3, [40, 80, 160, 320]),
    ],
)
def test_convergence_order(name: str, expected: float, tolerance: float, steps: list[int]) -> None:
    assert measured_order(DETERMINISTIC[name], steps) == pytest.approx(expected, abs=tolerance)


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_unipc_is_at_least_fourth_order(name: str) -> None:
    # UniP-3 corrected by UniC is fourth order. The slope is steeper here (4.59 bh1, 4.77 bh2) because the error
    # changes sign near 140 steps; past 300 steps the first step (order 1, corrected to 2) dominates and it tends
    # to 3, at errors below 5e-8.
    assert measured_order(DETERMINISTIC[name], ORDER_STEPS) > 4.0 - 0.3


# -- stochastic: the data distribution --


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_sampler_reproduces_data_distribution(name: str) -> None:
    # 4 standard errors of the sample mean (s / sqrt(N)) and of the sample std (about s / sqrt(2N)); measured at
    # 400 steps: mean 0.4998 for both, std 0.7036 (2M SDE Heun) and 0.7035 (3M SDE).
    model = GaussianDataModel()
    mean, std = sample_stats(name)
    assert mean == pytest.approx(model.mu, abs=4 * model.s / math.sqrt(STATS_SAMPLES))
    assert std == pytest.approx(model.s, abs=4 * model.s / math.sqrt(2 * STATS_SAMPLES))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_batch_sample_equals_single_run_with_its_seed(name: str) -> None:
    _, batch = run(name, seed=10)
    for i in range(2):
        _, denoiser = analytic_denoiser()
        sigmas = sampling.get_sigmas_karras(8, denoiser.sigma_min, denoiser.sigma_max)
        noise = Noise.from_seed(10 + i, 1)
        x = noise.randn((1, 1, 4, 4), dtype=torch.float64) * sigmas[0]
        single = STOCHASTIC[name](denoiser, x, sigmas, noise=noise, progress=False)
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=0)


# -- every sampler: parameterizations, model calls, callbacks --


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_v_and_x0_models_sample_like_eps_models(name: str, parameterization: str) -> None:
    torch.testing.assert_close(run(name, parameterization)[1], run(name)[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("name", sorted(ALL))
def test_one_model_call_per_step(name: str, steps: int) -> None:
    # UniPC too: its corrector's call at the next sigma is that step's estimate; the last step has none.
    model, _ = run(name, steps=steps)
    assert model.calls == steps


@pytest.mark.parametrize("name", sorted(ALL))
def test_callback_sees_every_step(name: str) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(5, denoiser.sigma_min, denoiser.sigma_max)
    seen = []
    ALL[name](denoiser, start_noise() * sigmas[0], sigmas, callback=seen.append, progress=False)
    assert [step["i"] for step in seen] == list(range(5))
    assert [step["sigma"] for step in seen] == sigmas[:-1].tolist()
    assert all(step["denoised"].shape == (2, 1, 4, 4) for step in seen)


@pytest.mark.parametrize("name", sorted(ALL))
def test_samplers_build_no_autograd_graph_when_called_directly(name: str) -> None:
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    sigmas = sampling.get_sigmas_karras(6, 0.03, 10.0)
    out = ALL[name](lambda x, sigma: x * weight, start_noise() * sigmas[0], sigmas, progress=False)
    assert not out.requires_grad


# -- how they relate --


def test_ipndm_v_is_ipndm_on_equal_steps() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = append_zero(torch.linspace(denoiser.sigma_max, denoiser.sigma_min, 12, dtype=torch.float64))
    x = start_noise() * sigmas[0]
    fixed = sampling.sample_ipndm(denoiser, x, sigmas, progress=False)
    torch.testing.assert_close(sampling.sample_ipndm_v(denoiser, x, sigmas, progress=False), fixed, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["deis", "ipndm", "ipndm_v"])
def test_order_one_is_euler(name: str) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(7, denoiser.sigma_min, denoiser.sigma_max)
    x = start_noise() * sigmas[0]
    euler = sampling.sample_euler(denoiser, x, sigmas, progress=False)
    torch.testing.assert_close(ALL[name](denoiser, x, sigmas, order=1, progress=False), euler, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_3m_sde_is_2m_sde_heun_until_it_has_two_earlier_estimates(eta: float) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = torch.tensor([10.0, 2.0, 0.5], dtype=torch.float64)
    x = start_noise() * sigmas[0]
    heun = sampling.sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, eta=eta, noise=Noise.from_seed(4, 2), progress=False)
    third = sampling.sample_dpmpp_3m_sde(denoiser, x, sigmas, eta=eta, noise=Noise.from_seed(4, 2), progress=False)
    torch.testing.assert_close(third, heun, rtol=0, atol=0)
    midpoint = sampling.sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=eta, noise=Noise.from_seed(4, 2), progress=False)
    assert not torch.allclose(midpoint, heun)


@pytest.mark.parametrize("schedule", ["karras", "discrete", "dpm_solver"])
@pytest.mark.parametrize("steps", [2, 3, 10])
def test_deis_weights_are_converged_integrals(schedule: str, steps: int) -> None:
    # Few steps are the widest in sigma, so the hardest for the quadrature; measured worst 1e-10 relative.
    sig = get_sigmas(schedule, steps, GaussianDataModel().schedule).tolist()
    for i in range(len(sig) - 1):
        if sig[i + 1] == 0:
            continue
        nodes = [sig[i - k] for k in range(min(i + 1, 3))]
        weights = lagrange_weights(nodes, sig[i], sig[i + 1], vp_time, DEIS_QUADRATURE_POINTS)
        reference = lagrange_weights(nodes, sig[i], sig[i + 1], vp_time, 64)
        assert max(abs(w - r) for w, r in zip(weights, reference, strict=True)) < 1e-9 * max(map(abs, reference))


def alpha_of(sigma: torch.Tensor) -> float:
    return 1 / math.sqrt(1 + float(sigma) ** 2)


def original_unipc(denoiser, x_t: torch.Tensor, sigmas: list[float], variant: str, order: int) -> torch.Tensor:
    """UniPC-p in data prediction from the paper's update rules in the VP variables (``alpha_t``, ``sigma_t``,
    ``lambda_t = log(alpha_t / sigma_t)``), written out independently: ``order - 1`` warm-up steps of orders 1, 2, ..,
    then order ``min(order, steps + 1 - step)``, the corrector on every step but the last. ``x_t``: the VP sample at
    ``sigmas[0]``; returns the VP sample at ``sigmas[-1] > 0``."""

    def alpha(s: float) -> float:
        return 1 / math.sqrt(1 + s * s)

    def model(x: torch.Tensor, s: float) -> torch.Tensor:
        return denoiser(x / alpha(s), s)

    def update(x, previous, t, p, use_corrector):
        s0, m0 = previous[-1]
        h = math.log(s0 / t)
        rks = [math.log(s0 / previous[-(k + 1)][0]) / h for k in range(1, p)] + [1.0]
        d1s = [(previous[-(k + 1)][1] - m0) / rks[k - 1] for k in range(1, p)]
        hh = -h
        b_h = hh if variant == "bh1" else math.expm1(hh)
        h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
        for k in range(1, p + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        big_r = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)])
        x_base = (t * alpha(t)) / (s0 * alpha(s0)) * x - alpha(t) * math.expm1(hh) * m0
        prediction = x_base
        if p > 1:
            rhos = [0.5] if p == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            prediction = x_base - alpha(t) * b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
        if not use_corrector:
            return prediction, None
        m_t = model(prediction, t)
        rhos = [0.5] if p == 1 else np.linalg.solve(big_r, b)
        correction = sum(r * d for r, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (m_t - m0)
        return x_base - alpha(t) * b_h * correction, m_t

    steps = len(sigmas) - 1
    previous = [(sigmas[0], model(x_t, sigmas[0]))]
    for step in range(1, steps + 1):
        p = step if step < order else min(order, steps + 1 - step)
        x_t, m = update(x_t, previous, sigmas[step], p, step < steps)
        previous.append((sigmas[step], m))
    return x_t


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [2, 3, 4, 6, 12])
def test_unipc_matches_the_original_algorithm(variant: str, steps: int) -> None:
    # ComfyUI runs order min(3, steps - 1); that schedule of orders is the one sample_uni_pc gives with order 3.
    model, denoiser = analytic_denoiser()
    sigmas = get_sigmas("dpm_solver", steps, model.schedule)
    x = start_noise() * sigmas[0]
    expected = original_unipc(denoiser, x * alpha_of(sigmas[0]), sigmas.tolist(), variant, min(3, steps - 1))
    out = sampling.sample_uni_pc(denoiser, x, sigmas, variant=variant, progress=False)
    torch.testing.assert_close(out * alpha_of(sigmas[-1]), expected, rtol=0, atol=1e-10)


def test_deis_weights_are_the_integrals_over_vp_time() -> None:
    # DEIS's own form: integrate the Lagrange basis in t against dsigma/dt, sigma(t) the VP schedule, by Simpson's
    # rule; lagrange_weights integrates over sigma with t = vp_time(sigma) instead.
    sig = get_sigmas("karras", 6, GaussianDataModel().schedule).tolist()
    for i in (2, 4):
        nodes = [sig[i - k] for k in range(3)]
        times = vp_time(np.array(nodes))
        taus = np.linspace(times[0], vp_time(np.array(sig[i + 1])), 2001)
        exponent = VP_BETA_D * taus**2 / 2 + VP_BETA_MIN * taus
        dsigma_dt = (VP_BETA_D * taus + VP_BETA_MIN) * np.exp(exponent) / (2 * np.sqrt(np.expm1(exponent)))
        simpson = np.array([1.0] + [4.0, 2.0] * 999 + [4.0, 1.0]) * (taus[1] - taus[0]) / 3
        for j, weight in enumerate(lagrange_weights(nodes, sig[i], sig[i + 1], vp_time, DEIS_QUADRATURE_POINTS)):
            basis = np.prod([(taus - times[k]) / (times[j] - times[k]) for k in range(3) if k != j], axis=0)
            assert weight == pytest.approx(float(np.dot(simpson, basis * dsigma_dt)), rel=1e-9)


# -- names and bad options --


@pytest.mark.parametrize(
    ("name", "expected_id", "schedule"),
    [
        ("UniPC", "uni_pc", "dpm_solver"),
        ("uni_pc", "uni_pc", "dpm_solver"),
        ("UniPC Karras", "uni_pc", "karras"),
        ("uni_pc_bh2", "uni_pc_bh2", "dpm_solver"),
        ("deis", "deis", "discrete"),
        ("ipndm", "ipndm", "discrete"),
        ("ipndm_v", "ipndm_v", "discrete"),
        ("DPM++ 3M SDE", "dpmpp_3m_sde", "discrete"),
        ("DPM++ 3M SDE Exponential", "dpmpp_3m_sde", "exponential"),
        ("k_dpmpp_3m_sde_ka", "dpmpp_3m_sde", "karras"),
        ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde", "discrete"),
        ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "discrete"),
        ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun", "karras"),
        ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "discrete"),
        ("dpmpp_2m_sde_heun_gpu", "dpmpp_2m_sde_heun", "discrete"),
        ("DPM++ 2M SDE", "dpmpp_2m_sde", "discrete"),
    ],
)
def test_names_users_know_resolve(name: str, expected_id: str, schedule: str) -> None:
    spec, resolved = resolve_sampler(name)
    assert (spec.id, resolved) == (expected_id, schedule)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (partial(sampling.sample_uni_pc, variant="bh3"), "UniPC variant must be one of bh1, bh2, got 'bh3'"),
        (partial(sampling.sample_uni_pc, order=4), r"UniPC order must be an integer in 1..3, got 4"),
        (partial(sampling.sample_uni_pc_bh2, order=0), r"UniPC order must be an integer in 1..3"),
        (partial(sampling.sample_deis, order=5), r"DEIS order must be an integer in 1..4"),
        (partial(sampling.sample_ipndm, order=True), r"iPNDM order must be an integer in 1..4, got True"),
        (partial(sampling.sample_ipndm_v, order=2.0), r"iPNDM_v order must be an integer"),
        (partial(sampling.sample_dpmpp_2m_sde, solver_type="euler"), "solver_type must be one of midpoint, heun"),
        (partial(sampling.sample_dpmpp_3m_sde, eta=-0.5), "eta must be >= 0"),
    ],
)
def test_bad_options_are_clear_errors(call, match: str) -> None:
    _, denoiser = analytic_denoiser()
    with pytest.raises(ValueError, match=match):
        call(denoiser, torch.zeros(1, 1), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), progress=False)


if __name__ == "__main__":
    print(f"max abs error at {HIGH_STEPS} Karras steps, and order over {ORDER_STEPS} (float64, start noise std 1):")
    for name, fn in DETERMINISTIC.items():
        print(f"  {name:20s} {max_error(fn, HIGH_STEPS):.2e}  {measured_order(fn, ORDER_STEPS):.2f}")
    model = GaussianDataModel()
    print(f"sample mean/std over {STATS_SAMPLES} samples (data: mean {model.mu}, std {model.s}):")
    for steps in (50, 400):
        for name in STOCHASTIC:
            mean, std = sample_stats(name, steps)
            print(f"  {name:20s} {steps:4d} steps  mean {mean:.4f}  std {std:.4f}")
