"""Named sigma schedules, zero-terminal-SNR rescaling and guidance rescale, each against its defining formula, a
published table or a closed form, and every schedule through every sampler of the front end on the analytic model."""

import math

import numpy as np
import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.models.diffusion.beta_quantile import beta_cdf, beta_ppf
from ldm.models.diffusion.guidance import GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import (
    SAMPLERS,
    SCHEDULE_LABELS,
    resolve_sampler,
    sample,
    schedule_names,
)
from ldm.models.diffusion.schedules import (
    COMPVIS_GRIDS,
    SIGMA_SCHEDULES,
    ZERO_SNR_ALPHA_CUMPROD,
    DiscreteSchedule,
    get_sigmas,
    rescale_zero_terminal_snr,
    zero_terminal_snr_betas,
)
from ldm.models.diffusion.schedules_named import (
    get_sigmas_exponential,
    get_sigmas_polyexponential,
    linear_quadratic_fractions,
)

T = 1000

# NVIDIA's published 10-step Align Your Steps sigmas (research.nvidia.com/labs/toronto-ai/AlignYourSteps).
AYS_PUBLISHED = {
    "ays_sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "ays_sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


@pytest.fixture(scope="module")
def exact():
    return GaussianDataModel(mu=0.5, s=0.7)


@pytest.fixture(scope="module")
def table(exact):
    return exact.schedule


def table_sigmas(table, timesteps):
    """The model's sigmas at integer timesteps, then 0, straight from alphas_cumprod."""
    a = table.alphas_cumprod[torch.as_tensor(list(timesteps))]
    return torch.cat([((1 - a) / a).sqrt(), torch.zeros(1, dtype=torch.float64)])


# -- every schedule: shape, endpoints, order, dtype --


@pytest.mark.parametrize("name", list(SIGMA_SCHEDULES))
@pytest.mark.parametrize("n", [1, 2, 10, 37, 100])
def test_every_schedule_is_a_decreasing_float64_cpu_table_of_n_plus_1_sigmas(table, name, n):
    sigmas = get_sigmas(name, n, table)
    assert sigmas.dtype == torch.float64 and sigmas.device.type == "cpu" and sigmas.dim() == 1
    # ddim_quad drops the timesteps its rule repeats; the other grids have exactly n steps at these n.
    assert len(sigmas) == n + 1 or (name == "ddim_quad" and len(sigmas) < n + 1)
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    assert sigmas[0] <= table.sigma_max * 1.001
    # The CompVis grids stop at the model's smallest noise level; every named schedule runs to sigma 0.
    assert float(sigmas[-1]) == (table.sigma_min if name in COMPVIS_GRIDS else 0.0)


# -- each schedule's defining property --


def test_polyexponential_is_exponential_at_rho_1_and_powers_the_log_ramp(table):
    lo, hi = table.sigma_min, table.sigma_max
    torch.testing.assert_close(get_sigmas("polyexponential", 12, table), get_sigmas_exponential(12, lo, hi))
    sigmas = get_sigmas_polyexponential(5, lo, hi, rho=2.0)[:-1]
    fraction = (sigmas.log() - math.log(lo)) / (math.log(hi) - math.log(lo))
    torch.testing.assert_close(fraction, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64) ** 2)


@pytest.mark.parametrize("n", [3, 9, 10])
def test_sgm_uniform_takes_the_model_sigmas_at_evenly_spaced_timesteps_but_the_last(table, n):
    ts = [(T - 1) * (1 - i / n) for i in range(n)]
    # The model's table, log-interpolated between integer timesteps (exact where T - 1 = 999 divides into n steps).
    log_sigmas = np.interp(ts, np.arange(T), table.sigmas.log().numpy())
    expected = torch.cat([torch.from_numpy(np.exp(log_sigmas)), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(get_sigmas("sgm_uniform", n, table), expected, rtol=1e-12, atol=0)
    if (T - 1) % n == 0:
        torch.testing.assert_close(get_sigmas("sgm_uniform", n, table), table_sigmas(table, [round(t) for t in ts]))


@pytest.mark.parametrize("n", [7, 10, 30])
def test_simple_takes_every_T_over_n_th_sigma_from_the_top(table, n):
    expected = table_sigmas(table, [T - 1 - (i * T) // n for i in range(n)])
    assert torch.equal(get_sigmas("simple", n, table), expected)


@pytest.mark.parametrize("n", [4, 10, 25])
def test_ddim_uniform_is_comfyuis_grid_from_timestep_1_in_strides_of_T_over_n(table, n):
    timesteps = list(range(1, T, T // n))  # ComfyUI's and A1111's rule, exactly n steps where n divides T
    assert torch.equal(get_sigmas("ddim_uniform", n, table), table_sigmas(table, timesteps[::-1]))


def test_ddim_uniform_keeps_n_steps_where_n_does_not_divide_T(table):
    # ComfyUI's rule gives len(range(1, 1000, 142)) = 8 steps for 7; the DDIM grid's rule keeps the lowest 7.
    assert torch.equal(get_sigmas("ddim_uniform", 7, table), table_sigmas(table, range(1 + 6 * 142, 0, -142)))


def test_beta_quantile_matches_closed_forms_and_a_numerical_cdf():
    q = torch.linspace(0, 1, 21, dtype=torch.float64)
    # Beta(1/2, 1/2) is the arcsine law, F(x) = 2 / pi * asin(sqrt(x)); Beta(a, 1) has F(x) = x^a.
    torch.testing.assert_close(beta_ppf(q, 0.5, 0.5), torch.sin(math.pi * q / 2) ** 2, rtol=0, atol=1e-13)
    torch.testing.assert_close(beta_ppf(q, 2.5, 1.0), q ** (1 / 2.5), rtol=0, atol=1e-13)
    torch.testing.assert_close(beta_ppf(q, 1.0, 3.0), 1 - (1 - q) ** (1 / 3), rtol=0, atol=1e-13)
    # Beta(0.6, 0.6): integrate the density after x = sin^2(u), which removes its end singularities.
    u = torch.linspace(0, math.pi / 2, 200001, dtype=torch.float64)
    density = 2 * torch.sin(u) ** 0.2 * torch.cos(u) ** 0.2
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(density, u)])
    cdf = cdf / cdf[-1]
    x = torch.sin(u[::10000]) ** 2
    torch.testing.assert_close(beta_cdf(x, 0.6, 0.6), cdf[::10000], rtol=0, atol=1e-6)
    torch.testing.assert_close(beta_ppf(q, 0.6, 0.6) + beta_ppf(1 - q, 0.6, 0.6), torch.ones_like(q))
    with pytest.raises(ValueError, match="a > 0 and b > 0"):
        beta_ppf(q, 0.0, 1.0)


@pytest.mark.parametrize("n", [5, 10, 40])
def test_beta_schedule_puts_timesteps_at_the_beta_quantiles(table, n):
    sigmas = get_sigmas("beta", n, table)
    timesteps = [round(table.sigma_to_t(s)) for s in sigmas[:-1].tolist()]
    assert torch.equal(sigmas, table_sigmas(table, timesteps))
    # Each timestep is the quantile of 1 - i / n rounded: the CDF brackets 1 - i / n within half a timestep.
    t = torch.tensor(timesteps, dtype=torch.float64)
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    assert bool((beta_cdf((t - 0.5) / (T - 1), 0.6, 0.6) <= q + 1e-12).all())
    assert bool((beta_cdf((t + 0.5) / (T - 1), 0.6, 0.6) >= q - 1e-12).all())
    assert timesteps[0] == T - 1


def test_beta_schedule_visits_a_repeated_timestep_once(table):
    sigmas = get_sigmas("beta", 300, table)
    q = 1 - torch.arange(300, dtype=torch.float64) / 300
    distinct = sorted(set(torch.round(beta_ppf(q, 0.6, 0.6) * (T - 1)).tolist()), reverse=True)
    assert len(distinct) < 300
    assert torch.equal(sigmas, table_sigmas(table, [int(t) for t in distinct]))


def test_kl_optimal_is_evenly_spaced_in_arctan_sigma(table):
    sigmas = get_sigmas("kl_optimal", 9, table)
    angles = torch.atan(sigmas[:-1])
    expected = torch.linspace(math.atan(table.sigma_max), math.atan(table.sigma_min), 9, dtype=torch.float64)
    torch.testing.assert_close(angles, expected, rtol=0, atol=1e-14)


def test_linear_quadratic_rises_linearly_to_the_threshold_then_quadratically_to_pure_noise(table):
    n, threshold = 10, 0.025
    noise = 1 - torch.tensor(linear_quadratic_fractions(n), dtype=torch.float64)
    linear = n // 2
    torch.testing.assert_close(
        noise[: linear + 1], torch.arange(linear + 1, dtype=torch.float64) * threshold / linear, rtol=0, atol=1e-15
    )
    second = noise[linear + 2 :] - 2 * noise[linear + 1 : -1] + noise[linear:-2]
    torch.testing.assert_close(second, second[:1].expand_as(second), rtol=0, atol=1e-14)
    # The quadratic continues the line with its slope: its derivative at the threshold step is threshold / linear.
    slope = (-3 * noise[linear] + 4 * noise[linear + 1] - noise[linear + 2]) / 2
    assert abs(float(slope) - threshold / linear) < 1e-14 and float(noise[-1]) == 1.0
    torch.testing.assert_close(get_sigmas("linear_quadratic", n, table), (1 - noise) * table.sigma_max)
    assert get_sigmas("linear_quadratic", 1, table).tolist() == [table.sigma_max, 0.0]


@pytest.mark.parametrize("name", list(AYS_PUBLISHED))
def test_align_your_steps_is_the_published_table_at_10_steps_and_log_linear_between(table, name):
    published = torch.tensor(AYS_PUBLISHED[name], dtype=torch.float64)
    assert get_sigmas(name, 10, table).tolist() == [*AYS_PUBLISHED[name][:10], 0.0]
    # At 20 steps the even points are the table's and the odd ones the geometric means of their neighbours.
    twenty = get_sigmas(name, 20, table)
    torch.testing.assert_close(twenty[0:20:2], published[:10], rtol=1e-14, atol=0)
    torch.testing.assert_close(twenty[1:20:2], (published[:-1] * published[1:]).sqrt(), rtol=1e-14, atol=0)
    assert float(twenty[-1]) == 0.0


@pytest.mark.parametrize("n", [7, 10, 50])
def test_diffusers_timestep_spacings_hit_the_documented_integer_timesteps(table, n):
    # diffusers' DDIMScheduler rules for timestep_spacing, with its default steps_offset = 0.
    expected = {
        "linspace": np.linspace(0, T - 1, n).round()[::-1].astype(np.int64),
        "leading": (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64),
        "trailing": np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1,
    }
    for spacing, timesteps in expected.items():
        assert torch.equal(get_sigmas(spacing, n, table), table_sigmas(table, timesteps.tolist())), spacing


def test_the_spacings_of_lin_et_al_table_2_at_10_steps(table):
    def timesteps(name):
        return [round(table.sigma_to_t(s)) for s in get_sigmas(name, 10, table)[:-1].tolist()]

    assert timesteps("linspace") == [999 - 111 * i for i in range(10)]
    assert timesteps("leading") == [900 - 100 * i for i in range(10)]
    assert timesteps("trailing") == [999 - 100 * i for i in range(10)]


# -- names users know --


@pytest.mark.parametrize(
    "name, sampler, schedule",
    [
        ("Euler a SGM Uniform", "euler_ancestral", "sgm_uniform"),
        ("dpmpp_2m_kl_optimal", "dpmpp_2m", "kl_optimal"),
        ("DPM++ 2M SDE Align Your Steps", "dpmpp_2m_sde", "ays_sd15"),
        ("DPM++ 2M AYS SDXL", "dpmpp_2m", "ays_sdxl"),
        ("dpmpp_2m_sde_gpu_beta", "dpmpp_2m_sde", "beta"),
        ("DPM2 a Simple", "dpm_2_ancestral", "simple"),
        ("Euler Polyexponential", "euler", "polyexponential"),
        ("euler_linear_quadratic", "euler", "linear_quadratic"),
        ("DDIM ddim_uniform", "ddim", "ddim_uniform"),
        ("Heun Uniform", "heun", "discrete"),
        ("LMS Normal", "lms", "discrete"),
        ("euler_SGMUniform", "euler", "sgm_uniform"),
        ("DPM++ 2M trailing", "dpmpp_2m", "trailing"),
        ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", "karras"),
    ],
)
def test_schedule_suffixes_of_every_length_resolve(name, sampler, schedule):
    spec, resolved = resolve_sampler(name)
    assert (spec.id, resolved) == (sampler, schedule)


A1111_SCHEDULE_TYPES = {
    "Automatic": "discrete",  # the sampler's default
    "Uniform": "discrete",
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Align Your Steps": "ays_sd15",
    "Simple": "simple",
    "Normal": "discrete",
    "DDIM": "ddim",
    "Beta": "beta",
}
COMFYUI_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "linear_quadratic"]


def test_every_a1111_label_and_comfyui_name_is_a_schedule_type():
    expected = {**A1111_SCHEDULE_TYPES, "normal": "discrete", "kl_optimal": "kl_optimal"}
    expected |= {name: name for name in COMFYUI_SCHEDULERS}
    assert {name: resolve_sampler("Euler", schedule=name)[1] for name in expected} == expected
    for name in schedule_names():
        assert resolve_sampler("Euler", schedule=name)[1] in SIGMA_SCHEDULES
    assert resolve_sampler("Euler a Karras", schedule="automatic")[1] == "karras"
    assert set(SCHEDULE_LABELS) <= set(SIGMA_SCHEDULES)
    with pytest.raises(ValueError, match="unknown schedule 'Fancy'. Known schedules: Normal, Karras"):
        resolve_sampler("Euler", schedule="Fancy")


# -- every schedule with every sampler that takes one --

RUNS_ANY_SCHEDULE = [name for name, spec in SAMPLERS.items() if spec.schedules]


def _flow_target(model, x_T, spec, schedule, steps):
    """The exact flow from where a run starts (A1111's x_T * sigma_0, CompVis's x_T * sqrt(1 + sigma_0^2)) to where
    it ends, as the front end returns it."""
    sigmas = get_sigmas(schedule, steps + (1 if spec.discard_penultimate_sigma else 0), model.schedule)
    first, last = float(sigmas[0]), float(sigmas[-1])
    if schedule in COMPVIS_GRIDS:
        x = model.exact_flow(x_T * math.sqrt(1 + first**2), first, last)
        return x / math.sqrt(1 + last**2)
    return model.exact_flow(x_T * first, first, 0.0)


@pytest.mark.parametrize("schedule", [name for name in SIGMA_SCHEDULES if name != "dpm_solver"])
def test_every_schedule_runs_with_every_sampler(exact, schedule):
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name in RUNS_ANY_SCHEDULE:
        spec = SAMPLERS[name]
        out = sample(exact, name, steps=12, x_T=x_T, schedule=schedule, noise=Noise.from_seed(4, 2), progress=False)
        assert out.shape == x_T.shape and torch.isfinite(out).all(), name
        if not spec.stochastic or name == "ddim":  # DDIM at its default eta 0 is deterministic
            error = (out - _flow_target(exact, x_T, spec, schedule, 12)).abs().max().item()
            # 12 steps leave first-order errors up to 0.16 on this data; linear_quadratic, made for flow models,
            # spends half of them within 2.5% of sigma_max and lands within 1 (|x_T| < 1.6 here). UniPC's multistep
            # extrapolation is poor across a step much longer in log-sigma than the one before, which the timestep-
            # uniform schedules end with (discrete: 0.323 -> 0.029 after 0.528 -> 0.323): measured 0.27 to 0.64 at
            # 12 steps, 0.20 at 24 (on its default grid and on Karras it stays within 0.06).
            loose = schedule == "linear_quadratic" or name.startswith("uni_pc")
            assert error < (1.0 if loose else 0.25), (name, error)


# -- zero terminal SNR --


def test_zero_terminal_snr_rescale_ends_at_pure_noise_and_keeps_the_first_level():
    original = GaussianDataModel().alphas_cumprod
    rescaled = rescale_zero_terminal_snr(original)
    assert float(rescaled[-1]) == 0.0
    torch.testing.assert_close(rescaled.sqrt()[0], original.sqrt()[0], rtol=1e-15, atol=0)
    assert bool((rescaled[:-1] > rescaled[1:]).all())
    # Algorithm 1 is affine in sqrt(alphas_cumprod): a shift to the last value, then one scale.
    ratio = rescaled.sqrt()[:-1] / (original.sqrt()[:-1] - original.sqrt()[-1])
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-12, atol=0)
    betas = zero_terminal_snr_betas(1 - original / torch.cat([original.new_ones(1), original[:-1]]))
    assert float(betas[-1]) == 1.0
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), rescaled, rtol=1e-12, atol=0)


def test_the_sampling_table_puts_zero_snr_at_a_finite_sigma():
    model = GaussianDataModel(zero_terminal_snr=True)
    assert float(model.alphas_cumprod[-1]) == 0.0
    table = model.schedule
    assert table.alpha_cumprod(T - 1) == ZERO_SNR_ALPHA_CUMPROD
    assert table.sigma_max == math.sqrt((1 - ZERO_SNR_ALPHA_CUMPROD) / ZERO_SNR_ALPHA_CUMPROD)
    assert torch.equal(table.alphas_cumprod[:-1], model.alphas_cumprod[:-1])
    assert bool((table.sigmas[1:] > table.sigmas[:-1]).all())
    # A table whose level before last lies below ComfyUI's value keeps its order.
    steep = torch.tensor([0.9, 1e-9, 0.0], dtype=torch.float64)
    assert bool((DiscreteSchedule(steep).sigmas.diff() > 0).all())


def _flow_error(model, name, schedule, x_T, steps=10):
    out = sample(model, name, steps=steps, x_T=x_T, schedule=schedule, noise=Noise.from_seed(3, 2), progress=False)
    assert torch.isfinite(out).all(), (name, schedule)
    return (out - _flow_target(model, x_T, SAMPLERS[name], schedule, steps)).abs().max().item()


@pytest.mark.parametrize("parameterization", ["v", "eps"])
def test_every_sampler_runs_on_a_zero_terminal_snr_schedule(parameterization):
    model = GaussianDataModel(mu=0.5, s=0.7, parameterization=parameterization, zero_terminal_snr=True)
    plain = GaussianDataModel(mu=0.5, s=0.7, parameterization=parameterization)
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    init = torch.full((2, 1, 2, 2), 0.25, dtype=torch.float64)
    for name, spec in SAMPLERS.items():
        for schedule in [spec.schedule] + (["karras", "sgm_uniform", "beta"] if spec.schedules else []):
            _flow_error(model, name, schedule, x_T)
        img2img = sample(model, name, steps=10, init_latent=init, strength=1.0, noise=Noise([3, 4]), progress=False)
        assert torch.isfinite(img2img).all(), name
        if not spec.stochastic or name == "ddim":
            # On the trailing spacing Lin et al. pair with zero SNR (or the sampler's own grid), a run from sigma
            # 4519 is as accurate as one on the usual schedule from 14.6.
            grid = "trailing" if spec.schedules else spec.schedule
            error, usual = _flow_error(model, name, grid, x_T), _flow_error(plain, name, grid, x_T)
            assert error < 1.2 * usual + 0.01, (name, error, usual)


def test_compvis_samplers_run_on_a_zero_terminal_snr_schedule():
    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler

    model = GaussianDataModel(parameterization="v", zero_terminal_snr=True)
    x_T = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for sampler in (DDIMSampler, PLMSSampler, DPMSolverSampler):
        samples, _ = sampler(model).sample(10, 1, (1, 2, 2), x_T=x_T, verbose=False)
        assert torch.isfinite(samples).all(), sampler.__name__
    ddim = DDIMSampler(model)
    ddim.make_schedule(10, verbose=False)
    encoded = ddim.stochastic_encode(torch.ones(1, 1, 2, 2, dtype=torch.float64), 10, noise=x_T)
    assert torch.equal(encoded, x_T)  # the top of a zero-SNR schedule is pure noise
    assert torch.isfinite(ddim.decode(encoded, None, t_start=10, verbose=False)).all()


def _pixel_ddpm(**params):
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 8,
            "in_channels": 1,
            "out_channels": 1,
            "model_channels": 32,
            "attention_resolutions": [],
            "num_res_blocks": 1,
            "channel_mult": [1],
            "num_heads": 4,
        },
    }
    from ldm.models.diffusion.ddpm import DDPM

    return DDPM(unet, image_size=8, channels=1, timesteps=10, use_ema=False, **params)


def test_ddpm_zero_terminal_snr_option_trains_and_samples():
    from ldm.util import ConfigError

    torch.manual_seed(0)
    plain = _pixel_ddpm(parameterization="v")
    model = _pixel_ddpm(parameterization="v", zero_terminal_snr=True)
    assert float(model.alphas_cumprod[-1]) == 0.0 and float(model.betas[-1]) == 1.0
    torch.testing.assert_close(model.sqrt_alphas_cumprod[0], plain.sqrt_alphas_cumprod[0])
    x0 = torch.randn(2, 1, 8, 8)
    last = torch.full((2,), 9, dtype=torch.long)
    noise = torch.randn_like(x0)
    assert torch.equal(model.q_sample(x0, last, noise), noise)
    assert torch.equal(model.get_v(x0, noise, last), -x0)
    loss, _ = model.p_losses(x0, last)
    assert torch.isfinite(loss)
    with torch.no_grad():
        x = model.p_sample_loop(None, (1, 1, 8, 8), noise=Noise([0]), progress=False)
    assert torch.isfinite(x).all()
    assert not _pixel_ddpm().zero_terminal_snr
    with pytest.raises(ConfigError, match="zero_terminal_snr needs parameterization 'v'"):
        _pixel_ddpm(zero_terminal_snr=True)


# -- guidance rescale --


class ScaledByCond(GaussianDataModel):
    """The analytic prediction times ``1 + cond``, so the conditional and the guided outputs differ in spread."""

    def apply_model(self, x_t, t, cond=None):
        out = super().apply_model(x_t, t)
        return out if cond is None else out * (1 + cond.to(out).view(-1, *([1] * (out.dim() - 1))))


def test_guidance_rescale_zero_is_off_and_one_gives_the_conditional_std():
    model = ScaledByCond()
    cond, uncond = torch.tensor([0.5, -0.25], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    off = GuidedEps(model, cond, uncond, 7.5).model_output(x_t, 500)
    assert torch.equal(GuidedEps(model, cond, uncond, 7.5, guidance_rescale=0.0).model_output(x_t, 500), off)
    conditional = GuidedEps(model, cond).model_output(x_t, 500)
    full = GuidedEps(model, cond, uncond, 7.5, guidance_rescale=1.0).model_output(x_t, 500)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)), rtol=1e-12, atol=0)
    # The rescale multiplies each sample by one factor: the guided output's shape is kept.
    factor = full / off
    torch.testing.assert_close(factor, factor[:, :1, :1, :1].expand_as(factor))
    half = GuidedEps(model, cond, uncond, 7.5, guidance_rescale=0.5).model_output(x_t, 500)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * off)


def test_guidance_rescale_through_the_front_end():
    model = ScaledByCond()
    cond, uncond = torch.tensor([0.5]), torch.zeros(1)
    run = {"steps": 6, "cond": cond, "uncond": uncond, "scale": 7.5, "shape": (1, 1, 4, 4), "progress": False}
    default = sample(model, "dpmpp_2m", noise=Noise([1]), **run)
    assert torch.equal(sample(model, "dpmpp_2m", noise=Noise([1]), guidance_rescale=0.0, **run), default)
    rescaled = sample(model, "dpmpp_2m", noise=Noise([1]), guidance_rescale=0.7, **run)
    assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, default)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
            sample(model, "dpmpp_2m", noise=Noise([1]), guidance_rescale=bad, **run)
