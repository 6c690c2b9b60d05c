"""scripts/image_variation.py and the Python API behind it (``Pipeline.generate(..., noise_level=...)``) on the tiny
unCLIP model of ``unclip_model.py``, saved to a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from programs import run_program
from unclip_model import SIZE, tiny_config, wake

from ldm import cli
from ldm.errors import UserError
from ldm.inference import Pipeline
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return wake(instantiate_from_config(tiny_config())).eval()


@pytest.fixture(scope="module")
def tiny_files(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unclip")
    OmegaConf.save(OmegaConf.create({"model": tiny_config()}), folder / "unclip.yaml")
    torch.save({"state_dict": model.state_dict()}, folder / "unclip.ckpt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "init.png")
    return folder


def test_pipeline_makes_seeded_variations_at_the_models_size(tiny_files):
    pipe = Pipeline.from_config(tiny_files / "unclip.yaml", tiny_files / "unclip.ckpt", device="cpu", precision="full")
    init = Image.open(tiny_files / "init.png")
    both = pipe.generate("", init_image=init, noise_level=100, n=2, seed=5, steps=3, sampler="Euler a")
    second = pipe.generate("", init_image=init, noise_level=100, n=1, seed=6, steps=3, sampler="Euler a")
    assert [im.size for im in both.images] == [(SIZE, SIZE)] * 2 and both.strength is None
    assert "Noise level: 100" in both.parameters(0) and "Denoising strength" not in both.parameters(0)
    # Image 1 of the batch is the single run of its seed (up to batched float rounding).
    diff = np.abs(np.asarray(both.images[1], dtype=int) - np.asarray(second.images[0], dtype=int))
    assert diff.max() <= 2
    other = pipe.generate("", init_image=init, noise_level=0, n=1, seed=6, steps=3, sampler="Euler a")
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(second.images[0]))
    with pytest.raises(UserError, match="noise_level"):
        pipe.generate("", init_image=init, steps=3)  # an img2img request
    with pytest.raises(UserError, match="init_image and noise_level"):
        pipe.generate("a cat", steps=3)  # a txt2img request
    with pytest.raises(UserError, match="noise_level"):
        pipe.generate("", init_image=init, noise_level=1000, steps=3)
    with pytest.raises(UserError, match="no mask and no strength"):
        pipe.generate("", init_image=init, noise_level=0, strength=0.5, steps=3)


def test_a_checkpoint_without_the_image_embedder_is_a_clear_error(model, tiny_files, tmp_path):
    from ldm.checkpoint import CheckpointError

    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("embedder.")}
    torch.save({"state_dict": weights}, tmp_path / "no-embedder.ckpt")
    with pytest.raises(CheckpointError, match=r"no-embedder.ckpt.*embedder\.model\."):
        Pipeline.from_config(tiny_files / "unclip.yaml", tmp_path / "no-embedder.ckpt", device="cpu")


def test_image_variation_script_rejects_bad_input_in_one_line(tiny_files, tmp_path, capsys):
    args = ["--config", str(tiny_files / "unclip.yaml"), "--ckpt", str(tiny_files / "unclip.ckpt"), "--device", "cpu"]
    code = cli.main("image_variation", [*args, "--init-img", str(tiny_files / "init.png"), "--noise_level", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "noise_level must be in 0..999" in err and len(err.strip().splitlines()) == 1
    assert cli.main("image_variation", [*args, "--init-img", str(tmp_path / "missing.png")]) == 2
    v2 = str(ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml")
    code = cli.main("image_variation", ["--config", v2, *args[2:], "--init-img", str(tiny_files / "init.png")])
    assert code == 2 and "need an unCLIP model" in capsys.readouterr().err


def test_image_variation_script_writes_samples(tiny_files, tmp_path):
    out = tmp_path / "out"
    run = run_program(
        "image_variation.py", "--config", str(tiny_files / "unclip.yaml"), "--ckpt", str(tiny_files / "unclip.ckpt"),
        "--init-img", str(tiny_files / "init.png"), "--device", "cpu", "--prompt", "a cat", "--noise_level", "50",
        "--steps", "2", "--n_samples", "2", "--n_iter", "1", "--sampler", "DPM++ 2M", "--seed", "3",
        "--outdir", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (SIZE, SIZE)
    assert len(list(out.glob("grid-*.png"))) == 1
