"""LatentDiffusion: the SD 1.x / 2.x key layout, and parity with the original on the tiny reference model."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.models.diffusion import ddpm, latent_diffusion, latent_inpainting, latent_upscale
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle on a blue background",
    "A painting of a virus monster playing guitar!",
    " ".join(["very"] * 100) + " long prompt",
]


def read_keys(path: Path) -> dict[str, tuple[int, ...]]:
    rows = path.read_text().splitlines()[1:]
    keys = {}
    for row in rows:
        key, shape, _ = row.split("\t")
        keys[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return keys


@pytest.mark.parametrize(
    "config_name, keys_name",
    [
        ("v1-inference.yaml", "sd-v1-keys.tsv"),
        ("v2-inference.yaml", "sd-v2-keys.tsv"),
        ("v2-inference-v.yaml", "sd-v2-keys.tsv"),
    ],
)
def test_sd_configs_have_reference_key_layout(reference_dir, config_name, keys_name):
    config = load_config(ROOT / "configs/stable-diffusion" / config_name)
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    assert isinstance(model, LatentDiffusion)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = read_keys(reference_dir / keys_name)
    assert sorted(set(expected) - set(actual)) == [], "keys missing from the model"
    assert sorted(set(actual) - set(expected)) == [], "keys the reference does not have"
    wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert wrong == {}


def test_the_compvis_paths_import_the_moved_classes_in_a_fresh_interpreter():
    # The first thing imported is the name a YAML target or a script gives: nothing else has loaded the modules yet.
    code = (
        "from ldm.models.diffusion.ddpm import LatentDiffusion, LatentInpaintDiffusion, LatentUpscaleDiffusion\n"
        "from ldm.models.diffusion import latent_diffusion, latent_inpainting, latent_upscale\n"
        "assert LatentDiffusion is latent_diffusion.LatentDiffusion\n"
        "assert LatentInpaintDiffusion is latent_inpainting.LatentInpaintDiffusion\n"
        "assert LatentUpscaleDiffusion is latent_upscale.LatentUpscaleDiffusion\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "name, cls",
    [
        ("LatentDiffusion", latent_diffusion.LatentDiffusion),
        ("LatentInpaintDiffusion", latent_inpainting.LatentInpaintDiffusion),
        ("LatentUpscaleDiffusion", latent_upscale.LatentUpscaleDiffusion),
    ],
)
def test_the_compvis_paths_name_the_moved_classes_for_configs_and_pickles(name, cls):
    assert get_obj_from_str(f"ldm.models.diffusion.ddpm.{name}") is cls
    assert name in dir(ddpm)
    # A pickle written before the move names the class by its old module (protocol 0 GLOBAL opcode).
    assert pickle.loads(f"cldm.models.diffusion.ddpm\n{name}\n.".encode()) is cls
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_a_misspelt_class_in_ddpm_suggests_the_moved_ones():
    with pytest.raises(ConfigError, match="has no 'LatentDifusion'. Did you mean 'LatentDiffusion'"):
        get_obj_from_str("ldm.models.diffusion.ddpm.LatentDifusion")
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchModel'"):
        ddpm.NoSuchModel  # noqa: B018


def test_v_config_is_v_parameterized():
    config = load_config(ROOT / "configs/stable-diffusion/v2-inference-v.yaml")
    assert config.model.params.parameterization == "v"


@torch.no_grad()
def test_unet_through_apply_model_matches_original(tiny_model, tiny_cases, assert_matches_reference):
    out = tiny_model.apply_model(tiny_cases["unet_x"], tiny_cases["unet_t"], tiny_cases["unet_context"])
    assert_matches_reference(out, tiny_cases["unet_out"])


@torch.no_grad()
def test_first_stage_matches_original(tiny_model, tiny_cases, assert_matches_reference):
    posterior = tiny_model.encode_first_stage(tiny_cases["vae_image"])
    assert_matches_reference(posterior.mean, tiny_cases["vae_posterior_mean"])
    assert_matches_reference(posterior.logvar, tiny_cases["vae_posterior_logvar"])
    assert_matches_reference(tiny_model.first_stage_model.decode(tiny_cases["vae_z"]), tiny_cases["vae_decoded"])
    assert_matches_reference(tiny_model.decode_first_stage(tiny_cases["vae_z"]), tiny_cases["decode_first_stage_out"])


@torch.no_grad()
def test_learned_conditioning_matches_original(tiny_model, tiny_cases, assert_matches_reference):
    with pytest.warns(UserWarning, match="truncat|dropped"):
        c = tiny_model.get_learned_conditioning(PROMPTS)
    assert c.shape == tiny_cases["clip_hidden"].shape
    assert_matches_reference(c, tiny_cases["clip_hidden"])


def test_q_sample_matches_original(tiny_model, tiny_cases, assert_matches_reference):
    out = tiny_model.q_sample(tiny_cases["q_z0"], tiny_cases["q_t"], noise=tiny_cases["q_noise"])
    assert_matches_reference(out, tiny_cases["q_out"])


def test_parameterizations_invert_each_other(tiny_model):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    xt = tiny_model.q_sample(x0, t, eps)
    torch.testing.assert_close(tiny_model.predict_start_from_noise(xt, t, eps), x0, atol=2e-4, rtol=1e-4)
    v = tiny_model.get_v(x0, eps, t)
    torch.testing.assert_close(tiny_model.predict_start_from_z_and_v(xt, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_model.predict_eps_from_z_and_v(xt, t, v), eps, atol=1e-5, rtol=1e-5)
    mean, var, _ = tiny_model.q_posterior(x0, xt, t)
    assert mean.shape == x0.shape and bool((var[0] == 0).all()) and bool((var[1:] > 0).all())


def test_schedule_is_sd_linear(tiny_model):
    betas = tiny_model.betas.double()
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    torch.testing.assert_close(tiny_model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


def test_ema_scope_swaps_in_ema_weights_and_restores(tiny_config):
    from ldm.util import apply_overrides

    config = apply_overrides(tiny_config, ["model.params.use_ema=true"])
    model = instantiate_from_config(config.model, path="model")
    param = model.model.diffusion_model.out[2].weight
    trained = param.detach().clone()
    with torch.no_grad():
        for p in model.model_ema.buffers():
            if p.is_floating_point() and p.dim() > 0:
                p.fill_(0.25)
    with model.ema_scope():
        assert bool((param == 0.25).all())
    torch.testing.assert_close(param, trained)


def test_unconditional_model_ignores_conditioning(tiny_config):
    from ldm.util import apply_overrides

    config = apply_overrides(
        tiny_config,
        [
            "model.params.cond_stage_config=__is_unconditional__",
            "model.params.conditioning_key=null",
            "model.params.unet_config.params.use_spatial_transformer=false",
            "model.params.unet_config.params.context_dim=null",
        ],
    )
    model = instantiate_from_config(config.model, path="model")
    assert model.cond_stage_model is None and model.model.conditioning_key is None
    out = model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]))
    assert out.shape == (1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="unconditional"):
        model.get_learned_conditioning(["a prompt"])


def test_unknown_parameterization_is_a_config_error(tiny_config):
    from ldm.util import ConfigError, apply_overrides

    config = apply_overrides(tiny_config, ["model.params.parameterization=epsilon"])
    with pytest.raises(ConfigError, match="parameterization 'epsilon'"):
        instantiate_from_config(config.model, path="model")
