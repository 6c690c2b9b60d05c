"""DPM++ 2S and 3S, DPM fast and DPM adaptive against closed-form answers for Gaussian data (see test_sampling.py).

Measured here (float64, start noise of std 1, Karras schedules ending at 0; ``python
tests/test_sampling_singlestep.py`` prints them):

=========  ====================  ================================  ===========
sampler    max error, 500 steps  measured order                    model calls
=========  ====================  ================================  ===========
dpmpp_2s   1.6e-5                2.02 (20..160 steps)              2 S - 1
dpmpp_3s   6.3e-9                2.95 (20..160 steps)              3 S - 2
dpm_fast   1.8e-6                3.28 (21..168 steps, see below)   S
=========  ====================  ================================  ===========

DPM fast's order depends on its last step's: S - 1 calls solve, and when S - 1 is a multiple of 3 the solve ends with
steps of order 2 and 1, else with one of order (S - 1) % 3. Over 21, 42, 84, 168 steps (last step order 2) it
converges at order 3.28; with a last step of order 1 at 2.11 and 1.57 (22..169 and 23..170 steps), and over the
usual 20..160 steps, which mix them, at 1.30.
"""

from __future__ import annotations

import math

import pytest
import torch
from analytic_model import GaussianDataModel
from test_sampling import (
    STATS_SAMPLES,
    analytic_denoiser,
    exact_result,
    max_error,
    measured_order,
    sample_stats,
    start_noise,
)

from ldm.models.diffusion import sampling
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.singlestep import fast_orders

FIXED = ["dpmpp_2s", "dpmpp_3s", "dpm_fast"]
# About twice the error measured at 500 Karras steps.
TOLERANCE = {"dpmpp_2s": 3e-5, "dpmpp_3s": 1.5e-8, "dpm_fast": 4e-6}
EXPECTED_ORDER = {"dpmpp_2s": 2.0, "dpmpp_3s": 3.0}
FAST_ORDER_STEPS = [21, 42, 84, 168]  # 20, 41, 83, 167 calls to the solve: every last step is of order 2


def slope(steps: list[int], errors: list[float]) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    logs_n = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    logs_e = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    dn = logs_n - logs_n.mean()
    return float(-(dn * (logs_e - logs_e.mean())).sum() / (dn * dn).sum())


def calls_for(name: str, steps: int, **options) -> int:
    model, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    getattr(sampling, f"sample_{name}")(denoiser, start_noise() * sigmas[0], sigmas, progress=False, **options)
    return model.calls


def adaptive_error(order: int, rtol: float, atol: float) -> tuple[float, sampling.AdaptiveInfo, int]:
    """DPM adaptive's max error scaled by its tolerance at the end, max(atol, rtol * |exact|); what it reported;
    and the model calls counted."""
    model, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(10, denoiser.sigma_min, denoiser.sigma_max)
    x = start_noise() * sigmas[0]
    out, info = sampling.dpm_adaptive(denoiser, x, sigmas, order=order, rtol=rtol, atol=atol, progress=False)
    exact = exact_result(model, x, sigmas, "dpm_adaptive")
    return float(((out - exact).abs() / torch.clamp(rtol * exact.abs(), min=atol)).max()), info, model.calls


# -- deterministic: the exact solution, the order, the calls --


@pytest.mark.parametrize("name", FIXED)
def test_lands_on_exact_solution(name: str) -> None:
    # DPM fast solves to the smallest positive sigma and denoises there: the same target as the one-step samplers.
    assert max_error(name, 500) < TOLERANCE[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_ORDER))
def test_convergence_order(name: str) -> None:
    assert measured_order(name) == pytest.approx(EXPECTED_ORDER[name], abs=0.3)


def test_dpm_fast_converges_at_third_order() -> None:
    assert slope(FAST_ORDER_STEPS, [max_error("dpm_fast", n) for n in FAST_ORDER_STEPS]) == pytest.approx(3.0, abs=0.3)


def test_dpmpp_2s_is_dpmpp_2s_ancestral_without_noise() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(7, denoiser.sigma_min, denoiser.sigma_max)
    x = start_noise() * sigmas[0]
    expected = sampling.sample_dpmpp_2s_ancestral(denoiser, x, sigmas, eta=0.0, progress=False)
    assert torch.equal(sampling.sample_dpmpp_2s(denoiser, x, sigmas, progress=False), expected)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10])
def test_exact_model_calls(steps: int) -> None:
    # The last step to sigma 0 takes one call; DPM fast spends exactly one call a step, whatever its orders.
    assert calls_for("dpmpp_2s", steps) == 2 * steps - 1
    assert calls_for("dpmpp_3s", steps) == 3 * steps - 2
    assert calls_for("dpm_fast", steps) == steps
    assert calls_for("dpm_fast", steps, eta=1.0, noise=Noise.from_seed(0, 2)) == steps


@pytest.mark.parametrize("calls", range(13))
def test_dpm_fast_orders_spend_exactly_the_calls(calls: int) -> None:
    orders = fast_orders(calls)
    assert sum(orders) == calls and all(1 <= order <= 3 for order in orders)
    assert orders[:-2] == [3] * len(orders[:-2])


def test_dpm_fast_without_a_final_zero_spends_every_call_on_the_solve() -> None:
    model, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(60, denoiser.sigma_min, denoiser.sigma_max)[:-1]
    x = start_noise() * sigmas[0]
    out = sampling.sample_dpm_fast(denoiser, x, sigmas, progress=False)
    assert model.calls == 59
    # 59 calls = 19 steps of order 3 and one of order 2 down to sigma_min; measured 8.2e-5.
    exact = model.exact_flow(x, float(sigmas[0]), float(sigmas[-1]))
    assert float((out - exact).abs().max()) < 1.6e-4


# -- DPM adaptive --


@pytest.mark.parametrize(
    ("order", "rtol", "limit"),
    # Measured scaled errors: order 3 at rtol 1e-4, 1e-5, 1e-6: 5.2, 6.3, 5.0 (at 1e-3 one large step makes it 39);
    # order 2 at rtol 1e-2 .. 1e-5: 2.9, 3.4, 3.4, 3.3. The tolerance bounds the local error of each step, so the
    # global error is a small multiple of it.
    [(3, 1e-4, 10), (3, 1e-5, 10), (3, 1e-6, 10), (2, 1e-2, 6), (2, 1e-3, 6), (2, 1e-4, 6)],
)
def test_dpm_adaptive_error_is_a_small_multiple_of_its_tolerance(order: int, rtol: float, limit: float) -> None:
    scaled, info, calls = adaptive_error(order, rtol, rtol * 0.156)
    assert scaled < limit
    assert info.calls == calls == 1 + info.accepted + (order - 1) * (info.accepted + info.rejected)


def test_dpm_adaptive_spends_calls_on_tolerance_not_steps() -> None:
    # Default rtol 0.05, atol 0.0078: 31 calls (8 steps accepted, 3 rejected), max error 5.8e-2. rtol 1e-4: 91 calls.
    _, default, _ = adaptive_error(3, 0.05, 0.0078)
    _, tight, _ = adaptive_error(3, 1e-4, 1e-4 * 0.156)
    assert default == (31, 8, 3)
    assert tight.calls > 2 * default.calls
    model, denoiser = analytic_denoiser()
    for steps in (5, 50):
        sigmas = sampling.get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
        _, info = sampling.dpm_adaptive(denoiser, start_noise() * sigmas[0], sigmas, progress=False)
        assert info == default


def test_dpm_adaptive_callback_sees_each_accepted_step_and_the_final_denoise() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(10, denoiser.sigma_min, denoiser.sigma_max)
    seen = []
    _, info = sampling.dpm_adaptive(denoiser, start_noise() * sigmas[0], sigmas, callback=seen.append, progress=False)
    assert [step["i"] for step in seen] == list(range(info.accepted + 1))
    assert seen[0]["sigma"] == float(sigmas[0]) and seen[-1]["sigma"] == float(sigmas[-2])
    assert all(a["sigma"] > b["sigma"] for a, b in zip(seen[:-1], seen[1:], strict=True))


@pytest.mark.parametrize(
    ("options", "match"),
    [({"order": 4}, "order must be 2 or 3"), ({"rtol": 0.0}, "rtol, atol and h_init"), ({"eta": -1.0}, "eta")],
)
def test_dpm_adaptive_bad_options(options: dict, match: str) -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(4, denoiser.sigma_min, denoiser.sigma_max)
    with pytest.raises(ValueError, match=match):
        sampling.sample_dpm_adaptive(denoiser, start_noise() * sigmas[0], sigmas, progress=False, **options)


# -- ancestral forms (A1111 runs DPM fast and adaptive with eta 1) --


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_ancestral_forms_reproduce_the_data_distribution(name: str) -> None:
    # 4 standard errors of the mean and std, as test_sampling. Measured: dpm_fast (400 steps) mean 0.5019 std
    # 0.7035; dpm_adaptive (default tolerances, 42 calls) mean 0.5013 std 0.6991.
    model = GaussianDataModel()
    mean, std = sample_stats(name, eta=1.0)
    assert mean == pytest.approx(model.mu, abs=4 * model.s / math.sqrt(STATS_SAMPLES))
    assert std == pytest.approx(model.s, abs=4 * model.s / math.sqrt(2 * STATS_SAMPLES))


def test_dpm_fast_rejects_negative_eta() -> None:
    _, denoiser = analytic_denoiser()
    sigmas = sampling.get_sigmas_karras(4, denoiser.sigma_min, denoiser.sigma_max)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sampling.sample_dpm_fast(denoiser, start_noise() * sigmas[0], sigmas, eta=-0.5, progress=False)


# -- every sampler here: v and x0 models, no autograd graph --


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize(
    ("name", "options"),
    [("dpmpp_2s", {}), ("dpmpp_3s", {}), ("dpm_fast", {}), ("dpm_fast", {"eta": 1.0}), ("dpm_adaptive", {})],
)
def test_v_and_x0_models_sample_like_eps_models(name: str, options: dict, parameterization: str) -> None:
    results = []
    for param in ["eps", parameterization]:
        _, denoiser = analytic_denoiser(param)
        sigmas = sampling.get_sigmas_karras(8, denoiser.sigma_min, denoiser.sigma_max)
        run = getattr(sampling, f"sample_{name}")
        results.append(run(denoiser, start_noise() * sigmas[0], sigmas, noise=Noise.from_seed(7, 2), **options))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", [*FIXED, "dpm_adaptive"])
def test_no_autograd_graph_when_called_directly(name: str) -> None:
    weight = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    sigmas = sampling.get_sigmas_karras(4, 0.03, 10.0)
    out = getattr(sampling, f"sample_{name}")(lambda x, sigma: x * weight, start_noise() * sigmas[0], sigmas)
    assert not out.requires_grad


if __name__ == "__main__":
    print("max abs error at 500 Karras steps, measured order over 20..160 steps, calls for 10 steps:")
    for name in FIXED:
        print(f"  {name:10s} {max_error(name, 500):.2e}  {measured_order(name):.2f}  {calls_for(name, 10)}")
    print(f"  dpm_fast order over {FAST_ORDER_STEPS}: ", end="")
    print(f"{slope(FAST_ORDER_STEPS, [max_error('dpm_fast', n) for n in FAST_ORDER_STEPS]):.2f}")
    for order, rtol in [(3, 0.05), (3, 1e-3), (3, 1e-4), (3, 1e-6), (2, 0.05), (2, 1e-4)]:
        scaled, info, _ = adaptive_error(order, rtol, 0.0078 if rtol == 0.05 else rtol * 0.156)
        print(f"  dpm_adaptive order {order} rtol {rtol:g}: error / tolerance {scaled:.2f}, {info}")
    for name in ("dpm_fast", "dpm_adaptive"):
        print(f"  {name} eta 1: mean/std {sample_stats(name, eta=1.0)}")
