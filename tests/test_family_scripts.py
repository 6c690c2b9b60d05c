"""scripts/superres.py (LDM bsr_sr), scripts/upscale.py (SD 2 x4 upscaler) and scripts/inpaint.py --indir (LDM
inpainting_big) on tiny models saved to tmp: through their ``main`` functions, and once each as a program
(``programs.run_program``)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_family import IMAGE, LATENT, save_model_folder, tiny_model
from omegaconf import OmegaConf
from PIL import Image
from programs import run_program

from ldm.concat_inpainting import binary_mask, image_mask_pairs, inpaint
from ldm.errors import UserError
from ldm.outputs import read_parameters
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _picture(path: Path, size: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# -- super-resolution --


@pytest.fixture(scope="module")
def bsr_folder(tmp_path_factory) -> Path:
    return save_model_folder("bsr_sr", tmp_path_factory.mktemp("bsr"))


def test_superres_makes_the_low_res_image_first_stage_factor_times_larger(bsr_folder, tmp_path, capsys):
    low = _picture(tmp_path / "low.png", LATENT)
    args = ["--init-img", str(low), "-r", str(bsr_folder), "--outdir", str(tmp_path / "out"), "-c", "3"]
    assert _script("superres").main([*args, "--n_samples", "2", "--seed", "5", "--device", "cpu"]) == 0
    outputs = sorted((tmp_path / "out").glob("*.png"))
    assert [Image.open(p).size for p in outputs] == [(IMAGE, IMAGE)] * 2  # f = 2 for the tiny model, 4 for bsr_sr
    assert "Steps: 3, Sampler: DDIM, Seed: 6" in read_parameters(outputs[1]) and "Eta: 1.0" in read_parameters(
        outputs[1]
    )
    assert capsys.readouterr().out.count("wrote ") == 2
    again = tmp_path / "again"
    assert (
        _script("superres").main([*args[:-4], "--outdir", str(again), "-c", "3", "--seed", "6", "--device", "cpu"]) == 0
    )
    assert np.array_equal(np.asarray(Image.open(outputs[1])), np.asarray(Image.open(again / "00000.png")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "0"], "steps must be an integer in 1..1000"),
        (["--init-img", "nowhere.png"], "nowhere.png"),
        (["-r", "nowhere"], "-r 'nowhere' does not exist"),
    ],
)
def test_superres_bad_input_is_one_line(bsr_folder, tmp_path, capsys, args, message):
    low = _picture(tmp_path / "low.png", LATENT)
    base = ["--init-img", str(low), "-r", str(bsr_folder), "--outdir", str(tmp_path), "--device", "cpu"]
    assert _script("superres").main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_superres_refuses_other_models(tmp_path):
    from ldm.superres import superresolve

    with pytest.raises(UserError, match="cond_stage_key LR_image"):
        superresolve(tiny_model("celeba256"), Image.new("RGB", (LATENT, LATENT)))
    with pytest.raises(UserError, match="multiples of 2"):
        superresolve(tiny_model("bsr_sr"), Image.new("RGB", (LATENT + 1, LATENT)))


# -- the SD 2 x4 upscaler --


@pytest.fixture(scope="module")
def upscaler_files(tmp_path_factory) -> tuple[Path, Path]:
    from test_upscale import tiny_config

    folder = tmp_path_factory.mktemp("x4")
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config())
    torch.save({"state_dict": model.state_dict()}, folder / "x4.ckpt")
    OmegaConf.save(OmegaConf.create({"model": tiny_config()}), folder / "x4.yaml")
    return folder / "x4.yaml", folder / "x4.ckpt"


def test_upscale_cli_writes_seeded_upscales_with_their_settings(upscaler_files, tmp_path):
    from test_upscale import HIGH, LOW

    config, ckpt = upscaler_files
    small = _picture(tmp_path / "small.png", LOW)
    args = ["--init-img", str(small), "--prompt", "a red circle", "--config", str(config), "--ckpt", str(ckpt)]
    args += ["--steps", "2", "--noise_level", "30", "--scale", "4", "--sampler", "Euler", "--seed", "3"]
    assert _script("upscale").main([*args, "--outdir", str(tmp_path / "out"), "--device", "cpu"]) == 0
    (out,) = (tmp_path / "out").glob("*.png")
    assert Image.open(out).size == (HIGH, HIGH)
    parameters = read_parameters(out)
    assert (
        parameters.startswith("a red circle\n") and "Noise level: 30" in parameters and "CFG scale: 4.0" in parameters
    )
    assert "Sampler: Euler" in parameters and "Seed: 3" in parameters


def test_upscale_cli_bad_input_is_one_line(upscaler_files, tmp_path, capsys):
    config, ckpt = upscaler_files
    small = _picture(tmp_path / "small.png", 8)
    base = ["--init-img", str(small), "--config", str(config), "--ckpt", str(ckpt), "--device", "cpu", "--steps", "2"]
    base += ["--outdir", str(tmp_path / "out")]
    assert _script("upscale").main([*base, "--noise_level", "1000"]) == 2
    assert "noise_level" in capsys.readouterr().err
    assert _script("upscale").main([*base[:4], "--ckpt", str(tmp_path / "none.ckpt"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- inpainting_big --


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory) -> Path:
    return save_model_folder("inpainting_big", tmp_path_factory.mktemp("inpainting"))


def _pairs(indir: Path) -> Path:
    indir.mkdir()
    for k, name in enumerate(("a", "b")):
        _picture(indir / f"{name}.png", IMAGE, seed=k)
        mask = np.zeros((IMAGE, IMAGE), dtype=np.uint8)
        mask[4:12, 2 + k : 10 + k] = 255
        Image.fromarray(mask).save(indir / f"{name}_mask.png")
    return indir


def test_inpaint_indir_repaints_each_pair_and_keeps_the_unmasked_pixels(inpainting_folder, tmp_path, capsys):
    indir, outdir = _pairs(tmp_path / "in"), tmp_path / "out"
    args = ["--indir", str(indir), "--outdir", str(outdir), "--steps", "3"]
    ckpt = ["--config", str(inpainting_folder / "config.yaml"), "--ckpt", str(inpainting_folder / "model.ckpt")]
    assert _script("inpaint").main([*args, *ckpt, "--device", "cpu"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["a.png", "b.png"]
    assert capsys.readouterr().out.startswith("Found 2 inputs.\n")
    for name in ("a", "b"):
        original, result = (np.asarray(Image.open(d / f"{name}.png")) for d in (indir, outdir))
        keep = np.asarray(Image.open(indir / f"{name}_mask.png")) < 128
        assert result.shape == original.shape and np.array_equal(result[keep], original[keep])
        assert not np.array_equal(result[~keep], original[~keep])


def test_inpaint_sends_the_unet_the_latent_the_encoded_masked_image_and_the_mask(monkeypatch):
    model = tiny_model("inpainting_big")
    assert model.model.diffusion_model.in_channels == 7 and model.cond_stage_model is model.first_stage_model
    seen = []
    forward = model.model.diffusion_model.forward
    monkeypatch.setattr(
        model.model.diffusion_model, "forward", lambda x, t, **kw: seen.append(x) or forward(x, t, **kw)
    )
    image = Image.fromarray(np.full((IMAGE, IMAGE, 3), 200, dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, dtype=np.uint8), 4))
    inpaint(model, image, mask, steps=2, seed=0, progress=False)
    x = seen[0]
    assert x.shape == (1, 7, LATENT, LATENT)
    # As CompVis: the masked image (1 - mask) * image in [0, 1], mapped to [-1, 1], through the VQ encoder.
    masked = torch.full((1, 3, IMAGE, IMAGE), 200 / 255) * (1 - binary_mask(mask))
    torch.testing.assert_close(x[:, 3:6], model.first_stage_model.encode(masked * 2 - 1))
    expected_mask = torch.nn.functional.interpolate(binary_mask(mask) * 2 - 1, size=(LATENT, LATENT))
    assert torch.equal(x[:, 6:], expected_mask)


def test_inpaint_indir_bad_input(inpainting_folder, tmp_path, capsys):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    Image.new("L", (IMAGE, IMAGE)).save(lonely / "c_mask.png")
    with pytest.raises(UserError, match="has no image beside it"):
        image_mask_pairs(lonely)
    ckpt = ["--config", str(inpainting_folder / "config.yaml"), "--ckpt", str(inpainting_folder / "model.ckpt")]
    assert _script("inpaint").main(["--indir", str(tmp_path / "none"), "--outdir", str(tmp_path), *ckpt]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(UserError, match="like models/ldm/inpainting_big"):
        inpaint(tiny_model("bsr_sr"), Image.new("RGB", (IMAGE, IMAGE)), Image.new("L", (IMAGE, IMAGE)))


def test_inpaint_without_indir_is_the_sd_command_line(capsys):
    assert _script("inpaint").main(["--help"]) == 0
    assert "--init-img" in capsys.readouterr().out


# -- each script as a user runs it --


def test_the_scripts_run_as_programs(bsr_folder, inpainting_folder, upscaler_files, tmp_path):
    low = _picture(tmp_path / "low.png", LATENT)
    done = run_program(
        "superres.py",
        "--init-img",
        str(low),
        "-r",
        str(bsr_folder),
        "--outdir",
        str(tmp_path / "sr"),
        "-c",
        "2",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "sr" / "00000.png").size == (IMAGE, IMAGE)
    config, ckpt = upscaler_files
    args = ["--init-img", str(low), "--config", str(config), "--ckpt", str(ckpt), "--steps", "2", "--device", "cpu"]
    done = run_program("upscale.py", *args, "--outdir", str(tmp_path / "x4"))
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "x4").glob("*.png"))) == 1
    indir = _pairs(tmp_path / "pairs")
    model = ["--config", str(inpainting_folder / "config.yaml"), "--ckpt", str(inpainting_folder / "model.ckpt")]
    done = run_program(
        "inpaint.py",
        "--indir",
        str(indir),
        "--outdir",
        str(tmp_path / "inpainted"),
        "--steps",
        "2",
        *model,
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "inpainted").iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize(
    "name, entry_point",
    [
        ("bsr_sr", "scripts/superres.py"),
        ("inpainting_big", "scripts/inpaint.py --indir"),
        ("semantic_synthesis512", "get_learned_conditioning(one-hot map)"),
        ("layout2img-openimages256", "ldm.data.layout tokens"),
    ],
)
def test_the_prompt_scripts_name_the_entry_point_of_image_conditioned_models(name, entry_point, tmp_path, capsys):
    from ldm import cli

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # refused from the config alone, before the checkpoint is read
    assert (
        cli.main("txt2img", ["--config", str(ROOT / "models" / "ldm" / name / "config.yaml"), "--ckpt", str(ckpt)]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: this config's model is conditioned on") and entry_point in err and err.count("\n") == 1
    )
