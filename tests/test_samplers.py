"""The sampler front end: names, txt2img / img2img / inpainting with every sampler, seeds, and input errors."""

import math

import pytest
import torch
from analytic_model import GaussianDataModel

from ldm.errors import UserError
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import (
    SAMPLERS,
    StopSampling,
    check_sampling_arguments,
    resolve_sampler,
    sample,
    sampler_names,
    sampler_options,
)
from ldm.models.diffusion.schedules import COMPVIS_GRIDS

ALL = list(SAMPLERS)
DETERMINISTIC = [k for k, spec in SAMPLERS.items() if not spec.stochastic]
FIXED_STEPS = [k for k, spec in SAMPLERS.items() if spec.fixed_steps]
ADAPTIVE = [k for k, spec in SAMPLERS.items() if not spec.fixed_steps]


@pytest.mark.parametrize(
    "name, expected_id, schedule",
    [
        ("Euler a", "euler_ancestral", "discrete"),
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("DPM++ SDE Karras", "dpmpp_sde", "karras"),
        ("DDIM", "ddim", "ddim"),
        ("PLMS", "plms", "ddim"),
        ("dpmpp_2m_sde_exponential", "dpmpp_2m_sde", "exponential"),
        ("k_euler_ancestral", "euler_ancestral", "discrete"),
        ("DPM2 a", "dpm_2_ancestral", "discrete"),
        ("dpm_solver", "dpm_solver", "dpm_solver"),
        ("  lms  ", "lms", "discrete"),
        # A1111's k_* aliases with their schedule suffixes, and ComfyUI's names.
        ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"),
        ("k_lms_ka", "lms", "karras"),
        ("k_dpmpp_2m_sde_exp", "dpmpp_2m_sde", "exponential"),
        ("dpmpp_sde_gpu", "dpmpp_sde", "discrete"),
        ("DDIM Karras", "ddim", "karras"),
        ("euler normal", "euler", "discrete"),
        ("DPM fast", "dpm_fast", "discrete"),
        ("k_dpm_ad", "dpm_adaptive", "discrete"),
        ("Restart", "restart", "karras"),
        ("LCM Karras", "lcm", "karras"),
        ("DPM++ 3S", "dpmpp_3s", "discrete"),
        ("Euler a CFG++", "euler_ancestral_cfg_pp", "discrete"),
        ("dpmpp_2m_cfg_pp_exponential", "dpmpp_2m_cfg_pp", "exponential"),
    ],
)
def test_names_users_know_resolve(name, expected_id, schedule):
    spec, resolved_schedule = resolve_sampler(name)
    assert (spec.id, resolved_schedule) == (expected_id, schedule)


def test_every_listed_name_resolves_and_unknown_names_are_clear():
    for name in sampler_names():
        resolve_sampler(name)
    with pytest.raises(ValueError, match=r"unknown sampler 'Eular a'.*Known samplers: DDIM, PLMS"):
        resolve_sampler("Eular a")
    with pytest.raises(ValueError, match="no karras schedule"):
        resolve_sampler("PLMS Karras")
    # DPM fast and adaptive use only the ends of a schedule, which every k-diffusion schedule shares.
    with pytest.raises(ValueError, match="'DPM fast' runs on its own grid .discrete.; it has no karras schedule"):
        resolve_sampler("DPM fast Karras")


@pytest.fixture(scope="module")
def exact():
    return GaussianDataModel(mu=0.5, s=0.7)


def _flow_target(model, x_T, name):
    # All samplers end at (or within a step of) sigma 0: compare with the exact flow from the top of the schedule,
    # which starts from x_T * sqrt(1 + sigma^2) on the CompVis grids and from x_T * sigma (A1111) otherwise.
    sigma_max = model.schedule.sigma_max
    compvis = SAMPLERS[name].schedule in COMPVIS_GRIDS
    x = x_T * (math.sqrt(1 + sigma_max**2) if compvis else sigma_max)
    return model.exact_flow(x, sigma_max, 0.0)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_land_on_the_flow_solution(exact, name):
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(exact, name, steps=200, x_T=x_T, progress=False)
    # DDIM/PLMS stop at alphas_cumprod[0] (sigma 0.029), the rest at 0: 2e-2 covers both and first-order error.
    torch.testing.assert_close(out, _flow_target(exact, x_T, name), atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_img2img_strength_zero_returns_input_and_one_works(exact, name):
    init = torch.full((2, 1, 2, 2), 0.25, dtype=torch.float64)
    noise = Noise.from_seed(3, 2)
    assert sample(exact, name, steps=10, init_latent=init, strength=0.0, noise=noise, progress=False) is init
    out = sample(exact, name, steps=10, init_latent=init, strength=1.0, noise=noise, progress=False)
    assert out.shape == init.shape and torch.isfinite(out).all()
    half = sample(exact, name, steps=10, init_latent=init, strength=0.5, noise=Noise.from_seed(3, 2), progress=False)
    assert not torch.equal(half, init)


@pytest.mark.parametrize("name, calls", [("ddim", 5), ("euler", 6), ("dpmpp_2m", 6)])
def test_img2img_runs_int_strength_times_steps_model_calls(name, calls):
    # CompVis runs int(strength * steps) DDIM steps, A1111 int(strength * steps) + 1 k-diffusion steps.
    model = GaussianDataModel()
    init = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    sample(model, name, steps=10, init_latent=init, strength=0.55, noise=Noise([0]), progress=False)
    assert model.calls == calls


@pytest.mark.parametrize("name", FIXED_STEPS)
def test_batch_of_three_equals_three_single_runs(exact, name):
    batch = sample(exact, name, steps=6, shape=(3, 1, 2, 2), noise=Noise.from_seed(11, 3), eta=None, progress=False)
    for i in range(3):
        single = sample(exact, name, steps=6, shape=(1, 1, 2, 2), noise=Noise([11 + i]), progress=False)
        torch.testing.assert_close(batch[i : i + 1], single)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_batch_is_within_tolerance_of_single_runs(exact, name):
    # A batch shares one step size, the one its worst image allows, so it matches single runs only to the
    # tolerance, and only without eta (its noise comes at other sigmas). Measured for DPM adaptive's default
    # rtol 0.05 and atol 0.0078 on these latents of std 0.7: 4e-3 (2e-3 to 7e-3 over four seeds).
    options = {"steps": 6, "eta": 0.0, "progress": False}
    batch = sample(exact, name, shape=(3, 1, 2, 2), noise=Noise.from_seed(11, 3), **options)
    for i in range(3):
        single = sample(exact, name, shape=(1, 1, 2, 2), noise=Noise([11 + i]), **options)
        torch.testing.assert_close(batch[i : i + 1], single, atol=2e-2, rtol=0)


def test_dpm_adaptive_chooses_its_own_steps(exact):
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [sample(exact, "DPM adaptive", steps=n, x_T=x_T, eta=0.0, progress=False) for n in (5, 50)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", ["ddim", "plms", "euler_a", "dpmpp_2m"])
def test_inpainting_mask_keeps_the_known_region(exact, name):
    init = torch.full((1, 1, 4, 4), -0.3, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2] = 1.0
    out = sample(exact, name, steps=20, init_latent=init, mask=mask, noise=Noise([5]), progress=False)
    # DDIM/PLMS end at alphas_cumprod[0], where the known region is x0 noised by sigma 0.029.
    assert (out[..., :2] - init[..., :2]).abs().max() < 0.1
    assert (out[..., 2:] - init[..., 2:]).abs().max() > 0.1


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_v_and_x0_models_give_the_same_samples(exact, parameterization):
    other = GaussianDataModel(mu=0.5, s=0.7, parameterization=parameterization)
    for name in ALL:
        a = sample(exact, name, steps=8, shape=(1, 1, 2, 2), noise=Noise([2]), progress=False)
        b = sample(other, name, steps=8, shape=(1, 1, 2, 2), noise=Noise([2]), progress=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


# DPM fast counts its steps in model calls, as k-diffusion and A1111 do (its steps take 1 to 3 calls each).
@pytest.mark.parametrize("name", [n for n in ALL if SAMPLERS[n].fixed_steps and n != "dpm_fast"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_every_sampler_runs_exactly_the_steps_asked_for(exact, name, steps):
    seen = []
    sample(exact, name, steps=steps, shape=(1, 1, 2, 2), noise=Noise([4]), callback=lambda i, d: seen.append(i),
           progress=False)  # fmt: skip
    assert seen == list(range(steps)), name


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_dpm_fast_makes_exactly_the_model_calls_asked_for(steps):
    model = GaussianDataModel()
    sample(model, "dpm_fast", steps=steps, shape=(1, 1, 2, 2), noise=Noise([4]), progress=False)
    assert model.calls == steps


def test_callback_sees_every_step(exact):
    seen = []
    sample(exact, "heun", steps=7, shape=(1, 1, 2, 2), callback=lambda i, d: seen.append(i), progress=False)
    assert seen == list(range(7))


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m", "ddim", "plms"])
def test_a_callback_stops_sampling_with_that_steps_estimate(exact, name):
    seen = []

    def stop_at_three(i, denoised):
        seen.append(denoised.clone())
        if i == 3:
            raise StopSampling

    out = sample(exact, name, steps=10, shape=(1, 1, 2, 2), noise=Noise([5]), callback=stop_at_three, progress=False)
    assert len(seen) == 4 and torch.equal(out, seen[-1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be an integer in 1..1000"),
        ({"steps": 1001}, "steps must be an integer in 1..1000"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"strength": 1.5, "init_latent": torch.zeros(1, 1, 2, 2)}, r"strength must be in \[0, 1\]"),
        ({"strength": 0.5}, "strength is for img2img"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"sampler": "euler", "eta": 0.5}, "deterministic"),
        ({"sampler": "plms", "eta": 0.5}, "'PLMS' only works with eta = 0"),
        ({"sampler": "DDPM", "eta": 0.5}, "'DDPM' only works with eta = 1 .use DDIM or an ancestral sampler"),
        ({"sampler": "ddpm", "eta": 0.0}, "'DDPM' only works with eta = 1"),
        ({"x_T": torch.zeros(1, 1, 3, 3)}, r"x_T has shape \(1, 1, 3, 3\), expected \(1, 1, 2, 2\)"),
        ({"mask": torch.ones(1, 1, 2, 2)}, "a mask needs init_latent"),
        ({"init_latent": torch.zeros(1, 1, 2, 2), "mask": torch.ones(1, 1, 4, 4)}, "mask has shape"),
        ({"noise": Noise([1, 2])}, "noise has 2 seeds for a batch of 1"),
        ({"sampler": "nope"}, "unknown sampler"),
    ],
)
def test_bad_arguments_are_clear_errors(exact, kwargs, message):
    arguments = {"sampler": "ddim", "steps": 5, "shape": (1, 1, 2, 2), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(exact, **arguments)


@torch.no_grad()
def test_tiny_model_txt2img_with_negative_prompt(tiny_model):
    c = tiny_model.get_learned_conditioning(["a red circle on a blue background"])
    uc = tiny_model.get_learned_conditioning(["blurry"])
    for name in ["DPM++ 2M Karras", "Euler a", "PLMS", "DPM++ 2M CFG++"]:
        z = sample(
            tiny_model,
            name,
            steps=4,
            cond=c,
            uncond=uc,
            scale=7.5,
            shape=(1, 4, 8, 8),
            noise=Noise([1]),
            progress=False,
        )
        assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()


def test_an_empty_sampler_name_and_an_unbounded_scale_are_refused():
    for name in ("", "  "):
        with pytest.raises(ValueError, match="the sampler name .* is empty; give one of DDIM, PLMS"):
            resolve_sampler(name)
    for scale in (1e308, -101.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"the guidance scale must be in -100..100"):
            check_sampling_arguments("ddim", 10, 1000, scale=scale)
    for scale in (-100.0, 0.0, 7.5, 100):
        check_sampling_arguments("ddim", 10, 1000, scale=scale)


def test_seeds_are_what_the_noise_generator_takes():
    assert Noise([0, 2**64 - 1]).seeds == [0, 2**64 - 1]
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=rf"seed {seed} is out of range: seeds are integers in 0..{2**64 - 1}"):
            Noise([seed])
    with pytest.raises(ValueError, match=f"seed {2**64} is out of range"):
        Noise.from_seed(2**64 - 1, 2)


def test_sampler_options_reach_the_sampler_and_unknown_ones_are_refused(exact):
    def run(**options):
        return sample(exact, "euler", steps=10, shape=(1, 1, 2, 2), noise=Noise([3]), options=options, progress=False)

    assert torch.equal(run(), run(s_churn=0.0))
    assert not torch.equal(run(), run(s_churn=1.0)), "Karras's churn adds noise"
    assert set(sampler_options(SAMPLERS["heun"])) == {"s_churn", "s_tmin", "s_tmax", "s_noise"}
    assert sampler_options(SAMPLERS["lms"]) == {"order": 4}
    with pytest.raises(UserError, match="sampler 'Euler' has no option 's_chrn'; its options: s_churn"):
        run(s_chrn=1.0)
    with pytest.raises(UserError, match="sampler option s_churn must be a finite number"):
        run(s_churn=float("nan"))


def test_a1111s_automatic_schedule_type_is_each_samplers_own_default():
    # A1111 1.6 on: "DPM++ 2M" with Schedule type "Automatic" is Karras; the bare name keeps the model's sigmas.
    assert resolve_sampler("DPM++ 2M", schedule="Automatic")[1] == "karras"
    assert resolve_sampler("DPM++ 2M")[1] == "discrete"
    assert resolve_sampler("DPM++ 3M SDE", schedule="automatic")[1] == "exponential"
    assert resolve_sampler("DPM++ 2M Exponential", schedule="Automatic")[1] == "exponential", "the name's wins"
    assert resolve_sampler("Euler", schedule="Automatic")[1] == "discrete"
    assert resolve_sampler("DDIM", schedule="Automatic")[1] == "ddim"
    # A1111 drops the next-to-last of steps + 1 sigmas for DPM2, DPM2 a and DPM++ 3M SDE.
    assert [n for n, s in SAMPLERS.items() if s.discard_penultimate_sigma] == [
        "dpm_2",
        "dpm_2_ancestral",
        "dpmpp_3m_sde",
    ]
