"""scripts/sample_diffusion.py: unconditional samples of a model folder or training logdir, CompVis's flags."""

import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.outputs import read_parameters
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
UNCONDITIONAL = [
    "model.params.cond_stage_config=__is_unconditional__",
    "model.params.conditioning_key=null",
    "model.params.cond_stage_trainable=false",
    "model.params.unet_config.params.use_spatial_transformer=false",
    "model.params.unet_config.params.context_dim=null",
]


def _script():
    spec = importlib.util.spec_from_file_location("sample_diffusion", ROOT / "scripts" / "sample_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A CompVis-style model folder (config.yaml + model.ckpt) of a tiny unconditional LDM."""
    folder = tmp_path_factory.mktemp("uncond")
    config = load_config(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml", UNCONDITIONAL)
    model = instantiate_from_config(config.model, path="model")
    torch.save({"state_dict": model.state_dict(), "global_step": 7}, folder / "model.ckpt")
    OmegaConf.save(config, folder / "config.yaml")
    return folder


def test_samples_a_model_folder_in_batches_with_seeds_and_metadata(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-r", str(model_folder), "-n", "3", "--batch_size", "2", "-c", "4", "-e", "0", "-l", str(out)]
    assert _script().main([*args, "--device", "cpu"]) == 0
    images = sorted((out / "img").glob("*.png"))
    assert [p.name for p in images] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(images[0]).size == (32, 32)
    assert [f"Seed: {s}," in read_parameters(p) for s, p in zip((0, 1, 2), images, strict=True)] == [True] * 3
    assert "Steps: 4, Sampler: DDIM" in read_parameters(images[0]) and "Eta: 0" in read_parameters(images[0])
    assert capsys.readouterr().out.count("wrote ") == 3


def test_vanilla_sampling_runs_ddpm_over_every_timestep_and_writes_beside_the_model(model_folder):
    assert _script().main(["-r", str(model_folder / "model.ckpt"), "-n", "1", "-v", "--device", "cpu"]) == 0
    (image,) = (model_folder / "samples").glob("*/img/00000.png")
    assert "Steps: 1000, Sampler: DDPM" in read_parameters(image)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-r", "nowhere"], "-r 'nowhere' does not exist"),
        (["-n", "0"], "--n_samples must be at least 1"),
        (["-c", "0"], "steps must be an integer in 1..1000"),
    ],
)
def test_bad_input_is_one_line(model_folder, capsys, args, message):
    full = ["-r", str(model_folder), *args] if args[0] != "-r" else args
    assert _script().main([*full, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_conditional_models_are_sent_to_their_scripts(tmp_path, capsys):
    config = load_config(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml")
    OmegaConf.save(config, tmp_path / "config.yaml")
    (tmp_path / "model.ckpt").write_bytes(b"")
    assert _script().main(["-r", str(tmp_path), "--device", "cpu"]) == 2
    assert "is a conditional model; sample it with scripts/txt2img.py" in capsys.readouterr().err
