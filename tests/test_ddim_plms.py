"""DDIM and PLMS: parity with the original on the tiny model, timesteps, exact Gaussian-data checks, img2img, errors."""

import math

import numpy as np
import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import sample_ddim, sample_plms
from ldm.models.diffusion.schedules import DiscreteSchedule, ddim_coefficients, ddim_sigmas, make_ddim_timesteps

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler}


# -- parity with the original implementation --


@pytest.mark.parametrize(
    "name", ["ddim_S10_scale7.5", "ddim_S50_scale7.5", "plms_S10_scale7.5", "plms_S50_scale7.5", "ddim_S10_scale1"]
)
def test_sample_matches_original(name, tiny_model, tiny_cases, assert_matches_reference):
    kind, steps, scale = name.split("_")
    x_T = tiny_cases["sample_xT"]
    samples, _ = SAMPLERS[kind](tiny_model).sample(
        S=int(steps[1:]),
        batch_size=x_T.shape[0],
        shape=x_T.shape[1:],
        conditioning=tiny_cases["sample_c"],
        unconditional_conditioning=tiny_cases["sample_uc"],
        unconditional_guidance_scale=float(scale[5:]),
        eta=0.0,
        x_T=x_T,
        verbose=False,
    )
    assert_matches_reference(samples, tiny_cases[name])


def test_img2img_matches_original(tiny_model, tiny_cases, assert_matches_reference):
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    z_enc = sampler.stochastic_encode(tiny_cases["img2img_z0"], t=[5, 5], noise=tiny_cases["img2img_noise"])
    assert_matches_reference(z_enc, tiny_cases["img2img_z_enc"])
    out = sampler.decode(
        z_enc,
        tiny_cases["sample_c"],
        t_start=5,
        unconditional_guidance_scale=7.5,
        unconditional_conditioning=tiny_cases["sample_uc"],
        verbose=False,
    )
    assert_matches_reference(out, tiny_cases["img2img_out"])


# -- timesteps --

SWEEP = [1, 2, 3, 7, 10, 30, 50, 250, 300, 333, 500, 501, 999, 1000]


@pytest.mark.parametrize("steps", SWEEP)
def test_exactly_S_distinct_timesteps_in_range(steps):
    timesteps = make_ddim_timesteps(steps)
    assert len(timesteps) == steps
    assert all(a < b for a, b in zip(timesteps, timesteps[1:], strict=False))
    assert 0 <= timesteps[0] and timesteps[-1] <= 999


def test_timesteps_equal_original_for_divisors_and_leading_spacing_otherwise():
    for steps in range(1, 1000):
        ours = make_ddim_timesteps(steps, 1000)
        if 1000 % steps == 0:
            original = np.arange(0, 1000, 1000 // steps) + 1
            assert ours == original.tolist(), steps
        leading = (np.arange(steps) * (1000 // steps)).round()[::-1].astype(int) + 1  # diffusers, steps_offset=1
        assert ours == sorted(leading.tolist()), steps
    assert make_ddim_timesteps(1000, 1000) == list(range(1000))


def test_the_original_rule_needed_fixing():
    # The original's arange(0, T, T // S) + 1 gives 31 steps for S = 30, and reaches t = 1000 for S = 300.
    assert len(np.arange(0, 1000, 1000 // 30) + 1) == 31 and len(make_ddim_timesteps(30)) == 30
    assert (np.arange(0, 1000, 1000 // 300) + 1).max() == 1000 and max(make_ddim_timesteps(300)) == 898


def test_ddim_table_follows_compvis():
    alphas_cumprod = GaussianDataModel().alphas_cumprod
    table = ddim_coefficients(alphas_cumprod, [1, 501], eta=1.0)
    assert table.alphas.tolist() == [alphas_cumprod[1].item(), alphas_cumprod[501].item()]
    assert table.alphas_prev.tolist() == [alphas_cumprod[0].item(), alphas_cumprod[1].item()]
    a, a_prev = alphas_cumprod[501], alphas_cumprod[1]
    assert table.sigmas[1].item() == pytest.approx(math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)))
    assert table.alphas.dtype == torch.float64 and table.alphas.device.type == "cpu"


# -- exact Gaussian-data checks --


def flow_error(sampler_cls, steps, parameterization="eps"):
    """Max error of a deterministic run against the exact probability-flow solution, in the sigma view."""
    model = GaussianDataModel(mu=0.5, s=0.7, parameterization=parameterization)
    sampler = sampler_cls(model)
    sampler.make_schedule(steps, verbose=False)
    # The run starts at the top DDIM timestep and ends at alphas_cumprod[0], not at the clean data (with every
    # timestep, S = 1000, its last step goes from there to the clean data: the denoised estimate at alphas_cumprod[0]).
    sigma_top, sigma_end = sampler.sigmas[0].item(), sampler.sigmas[-1].item()
    generator = torch.Generator().manual_seed(0)
    x_sigma = model.mu + math.hypot(model.s, sigma_top) * torch.randn(2, 1, 8, 8, generator=generator).double()
    out, _ = sampler.sample(steps, 2, (1, 8, 8), x_T=x_sigma / math.hypot(1, sigma_top), verbose=False)
    if sigma_end == 0:
        sigma_last = sampler.sigmas[-2].item()
        x_last = model.exact_flow(x_sigma, sigma_top, sigma_last)
        exact = model.mu + (x_last - model.mu) * model.s**2 / (model.s**2 + sigma_last**2)
    else:
        exact = model.exact_flow(x_sigma, sigma_top, sigma_end)
    return (out * math.hypot(1, sigma_end) - exact).abs().max().item()


def test_ddim_lands_on_the_probability_flow_solution_with_first_order():
    # Measured: 8.8e-3 at S = 500, 4.6e-3 at S = 1000, for samples of magnitude up to 2.5.
    err_500, err_1000 = flow_error(DDIMSampler, 500), flow_error(DDIMSampler, 1000)
    assert err_1000 < 5e-3
    assert 1.8 < err_500 / err_1000 < 2.2


def test_plms_lands_on_the_probability_flow_solution():
    # Measured: 3.2e-3 at S = 50 (DDIM needs S = 1000 for that), 1.9e-4 at S = 100, 6.1e-5 at S = 1000.
    assert flow_error(PLMSSampler, 50) < 4e-3
    assert flow_error(PLMSSampler, 100) < 3e-4
    assert flow_error(PLMSSampler, 1000) < 1e-4


class IndexingModel(GaussianDataModel):
    """A third-party style model that indexes its schedule table with ``t``, as CompVis code may."""

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, *([1] * (x_t.dim() - 1)))  # "tensors used as indices must be long"
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_compvis_samplers_pass_integer_timesteps_as_long(sampler_cls):
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    indexed = sampler_cls(IndexingModel()).sample(10, 2, (1, 4, 4), x_T=x_T, verbose=False)[0]
    plain = sampler_cls(GaussianDataModel()).sample(10, 2, (1, 4, 4), x_T=x_T, verbose=False)[0]
    torch.testing.assert_close(indexed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_v_model_gives_the_eps_result(sampler_cls):
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    runs = [
        sampler_cls(GaussianDataModel(parameterization=p)).sample(20, 2, (1, 4, 4), x_T=x_T, verbose=False)[0]
        for p in ("eps", "v")
    ]
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-10)


def test_ddim_eta1_reproduces_the_data_distribution():
    # eta = 1 is DDPM ancestral sampling over the timesteps; started from the exact marginal at the top, it keeps
    # the mean exactly, and its std converges as steps are added (measured 0.6957 vs 0.7006 at S = 1000).
    model = GaussianDataModel(mu=0.5, s=0.7)
    sampler = DDIMSampler(model)
    sampler.make_schedule(1000, ddim_eta=1.0, verbose=False)
    a_top, a_end = sampler.ddim_alphas[-1].item(), sampler.ddim_alphas_prev[0].item()
    noise = Noise([7, 8, 9, 10])
    z = noise.randn((4, 1, 100, 100), dtype=torch.float64)
    x_T = math.sqrt(a_top) * model.mu + math.sqrt(a_top * model.s**2 + 1 - a_top) * z
    out, _ = sampler.sample(1000, 4, (1, 100, 100), eta=1.0, x_T=x_T, noise=noise, verbose=False)
    x = out / math.sqrt(a_end)
    std = math.sqrt(model.s**2 + (1 - a_end) / a_end)
    standard_error = std / math.sqrt(x.numel())
    assert abs(x.mean().item() - model.mu) < 4 * standard_error
    assert abs(x.std().item() - std) < 4 * standard_error / math.sqrt(2) + 0.006


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
def test_inpainting_keeps_the_known_region(sampler_cls):
    # The analytic model acts elementwise, so the unknown region must equal an unmasked run exactly.
    model = GaussianDataModel(mu=0.5, s=0.7)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)).double()
    x0 = torch.full((1, 1, 4, 4), -1.0, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2] = 1
    free, _ = sampler_cls(model).sample(20, 1, (1, 4, 4), x_T=x_T, verbose=False)
    inpainted, _ = sampler_cls(model).sample(
        20, 1, (1, 4, 4), x_T=x_T, mask=mask, x0=x0, noise=Noise([0]), verbose=False
    )
    assert torch.equal(inpainted[..., 2:], free[..., 2:])
    torch.testing.assert_close(inpainted[..., :2], x0[..., :2], rtol=0, atol=0.1)
    assert (free[..., :2] - x0[..., :2]).abs().min() > 0.5


def test_callbacks_and_intermediates():
    model = GaussianDataModel()
    steps_seen, pred_seen = [], []
    _, intermediates = DDIMSampler(model).sample(
        10,
        1,
        (1, 2, 2),
        log_every_t=5,
        callback=steps_seen.append,
        img_callback=lambda pred_x0, i: pred_seen.append(i),
        verbose=False,
    )
    assert steps_seen == pred_seen == list(range(10))
    # The start, then after the steps with index 9 (the first), 5 and 0.
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 4


# -- img2img and seeds --


def test_img2img_strength_one_encodes_at_the_top_and_runs_every_step():
    model = GaussianDataModel()
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, verbose=False)
    z0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)).double()
    n = torch.randn_like(z0)
    z_enc = sampler.stochastic_encode(z0, t=[10, 10], noise=n)
    a_top = model.alphas_cumprod[-1].item()
    torch.testing.assert_close(z_enc, math.sqrt(a_top) * z0 + math.sqrt(1 - a_top) * n)
    model.calls = 0
    out = sampler.decode(z_enc, None, t_start=10, verbose=False)
    assert model.calls == 10
    full, _ = sampler.sample(10, 2, (1, 4, 4), x_T=z_enc, verbose=False)
    torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_decode_over_the_original_steps_reaches_the_clean_data():
    # use_original_steps walks all 1000 training timesteps down to alphas_cumprod_prev[0] = 1 (measured error 6.7e-3).
    model = GaussianDataModel(mu=0.5, s=0.7)
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, verbose=False)
    a_top = model.alphas_cumprod[-1].item()
    sigma_top = math.sqrt((1 - a_top) / a_top)
    generator = torch.Generator().manual_seed(0)
    x_sigma = model.mu + math.hypot(model.s, sigma_top) * torch.randn(2, 1, 8, 8, generator=generator).double()
    out = sampler.decode(x_sigma * math.sqrt(a_top), None, t_start=1000, use_original_steps=True, verbose=False)
    assert model.calls == 1000
    torch.testing.assert_close(out, model.exact_flow(x_sigma, sigma_top, 0.0), rtol=0, atol=1e-2)


def test_img2img_strength_zero_returns_the_input():
    model = GaussianDataModel()
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, verbose=False)
    z = torch.randn(2, 1, 4, 4)
    assert torch.equal(sampler.decode(z, None, t_start=0, verbose=False), z)
    assert model.calls == 0


@pytest.mark.parametrize("run", ["sample", "decode"])
def test_image_i_of_a_batch_equals_a_single_run_with_seed_s_plus_i(run):
    sampler = DDIMSampler(GaussianDataModel())

    def generate(seeds):
        noise = Noise(seeds)
        if run == "sample":
            return sampler.sample(10, len(seeds), (1, 4, 4), eta=0.7, noise=noise, verbose=False)[0]
        sampler.make_schedule(10, ddim_eta=0.7, verbose=False)
        z = sampler.stochastic_encode(torch.zeros(len(seeds), 1, 4, 4), t=6, noise=noise)
        return sampler.decode(z, None, t_start=6, noise=noise, verbose=False)

    batch = generate([100, 101, 102])
    single = generate([101])
    torch.testing.assert_close(batch[1:2], single, rtol=0, atol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_seeded_noise_dropout_and_temperature_change_the_run():
    model = GaussianDataModel()
    sigmas = ddim_sigmas(DiscreteSchedule(model.alphas_cumprod), 10)
    x = torch.zeros(2, 1, 4, 4)

    def run(**options):
        return sample_ddim(
            Denoiser(GuidedEps(model)), x, sigmas, eta=1.0, noise=Noise([5, 6]), progress=False, **options
        )

    assert torch.equal(run(), run())
    assert not torch.equal(run(s_noise=0.5), run())
    assert not torch.equal(run(noise_dropout=0.5), run())


# -- errors --


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler])
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5])
def test_bad_step_count(sampler_cls, steps):
    with pytest.raises(ValueError, match="S must"):
        sampler_cls(GaussianDataModel()).sample(steps, 1, (1, 2, 2), verbose=False)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"eta": -0.1}, "eta must be >= 0"),
        ({"eta": 1.5}, "eta = 1.5 is too large"),
        ({"x_T": torch.zeros(2, 1, 2, 2)}, "x_T has shape"),
        ({"mask": torch.ones(1, 1, 2, 2)}, "both mask and x0"),
        ({"noise_dropout": 1.0}, "noise_dropout"),
        ({"score_corrector": object()}, "score_corrector"),
        ({"quantize_x0": True}, "quantize_x0"),
    ],
)
def test_bad_sample_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        DDIMSampler(GaussianDataModel()).sample(10, 1, (1, 2, 2), verbose=False, **options)


def test_plms_refuses_eta_and_other_discretizations():
    with pytest.raises(ValueError, match="ddim_eta must be 0 for PLMS"):
        PLMSSampler(GaussianDataModel()).sample(10, 1, (1, 2, 2), eta=0.5, verbose=False)
    with pytest.raises(ValueError, match="ddim_discretize"):
        PLMSSampler(GaussianDataModel()).make_schedule(10, ddim_discretize="quad", verbose=False)


def test_bad_img2img_arguments():
    sampler = DDIMSampler(GaussianDataModel())
    z = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="make_schedule"):
        sampler.decode(z, None, t_start=1)
    sampler.make_schedule(10, verbose=False)
    for t_start in (-1, 11):
        with pytest.raises(ValueError, match=r"t_start must be in 0\.\.10"):
            sampler.decode(z, None, t_start=t_start)
    with pytest.raises(ValueError, match=r"t must be step indices in 0\.\.10"):
        sampler.stochastic_encode(z, t=[3, 11])
    with pytest.raises(ValueError, match="t has 3 entries"):
        sampler.stochastic_encode(z, t=[3, 3, 3])


@pytest.mark.parametrize("loop", [sample_ddim, sample_plms])
def test_the_loops_build_no_autograd_graph_when_called_directly(loop):
    weight = torch.nn.Parameter(torch.tensor(0.5))
    sigmas = ddim_sigmas(DiscreteSchedule(GaussianDataModel().alphas_cumprod), 5)
    out = loop(lambda x, sigma: x * weight, torch.ones(1, 1, 2, 2), sigmas, progress=False)
    assert not out.requires_grad
