"""scripts/sample_diffusion.py: unconditional samples of a model folder or training logdir, CompVis's flags."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_family import save_model_folder
from omegaconf import OmegaConf
from PIL import Image
from programs import run_program

from ldm.errors import UserError
from ldm.inference import Pipeline
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


def _save_model_folder(folder: Path, overrides: list[str]) -> Path:
    config = load_config(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml", overrides)
    model = instantiate_from_config(config.model, path="model")
    torch.save({"state_dict": model.state_dict(), "global_step": 7}, folder / "model.ckpt")
    OmegaConf.save(config, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A CompVis-style model folder (config.yaml + model.ckpt) of a tiny unconditional LDM."""
    return _save_model_folder(tmp_path_factory.mktemp("uncond"), UNCONDITIONAL)


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


def test_vanilla_sampling_runs_ddpm_over_every_timestep_and_writes_beside_the_model(tmp_path):
    folder = _save_model_folder(tmp_path, [*UNCONDITIONAL, "model.params.timesteps=100"])  # 1000 steps take 10 s
    assert _script().main(["-r", str(folder / "model.ckpt"), "-n", "1", "-v", "--device", "cpu"]) == 0
    (image,) = (folder / "samples").glob("*/img/00000.png")
    assert "Steps: 100, Sampler: DDPM" in read_parameters(image)


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


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """A model folder of a tiny cin256: 10 classes and the unconditional class 10, as cin256-v2 has 1000 and 1000."""
    return save_model_folder("cin256", tmp_path_factory.mktemp("cin"))


def _classes_and_scales(folder: Path) -> list[tuple[str, str]]:
    fields = [
        dict(f.split(": ") for f in read_parameters(p).splitlines()[-1].split(", "))
        for p in sorted(folder.glob("*.png"))
    ]
    return [(f["Class"], f["CFG scale"]) for f in fields]


def test_class_conditional_samples_of_each_listed_class_with_guidance(class_folder, tmp_path):
    args = ["-r", str(class_folder), "--classes", "3,7", "-n", "2", "--batch_size", "2", "-c", "3", "-e", "0"]
    assert _script().main([*args, "--scale", "3", "-l", str(tmp_path / "cfg"), "--device", "cpu"]) == 0
    assert _classes_and_scales(tmp_path / "cfg" / "img") == [("3", "3.0")] * 2 + [("7", "3.0")] * 2
    assert _script().main([*args, "-l", str(tmp_path / "plain"), "--device", "cpu"]) == 0
    guided, plain = (np.asarray(Image.open(tmp_path / run / "img" / "00000.png")) for run in ("cfg", "plain"))
    assert not np.array_equal(guided, plain)  # the guidance reaches the sampler


def test_class_conditional_batches_draw_their_classes_from_their_seed(class_folder, tmp_path):
    args = ["-r", str(class_folder), "-n", "3", "--batch_size", "2", "-c", "2", "--device", "cpu"]
    assert _script().main([*args, "-l", str(tmp_path / "a")]) == 0
    assert _script().main([*args, "-l", str(tmp_path / "b")]) == 0
    drawn = [label for label, _ in _classes_and_scales(tmp_path / "a" / "img")]
    assert drawn == [label for label, _ in _classes_and_scales(tmp_path / "b" / "img")]
    assert len(drawn) == 3 and all(0 <= int(label) < 10 for label in drawn)


@pytest.mark.parametrize(
    "overrides, args, message",
    [
        ([], ["--classes", "10"], "class labels [10] are not classes of this model; give labels from 0 to 9"),
        ([], ["--classes", "1,x"], "--classes takes class numbers separated by commas"),
        (["model.params.cond_stage_config.params.n_classes=1000"], ["--scale", "3"], "no unconditional class"),
    ],
)
def test_bad_class_input_is_one_line(tmp_path, capsys, overrides, args, message):
    folder = save_model_folder("cin256", tmp_path / "model", *overrides)
    assert _script().main(["-r", str(folder), "-n", "1", "-c", "2", *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_classes_are_refused_for_unconditional_models(model_folder, capsys):
    assert _script().main(["-r", str(model_folder), "--classes", "1", "--device", "cpu"]) == 2
    assert "--classes and --scale are for class-conditional models" in capsys.readouterr().err


def test_pipeline_refuses_class_labels_for_a_text_model_and_prompts_for_a_class_model(class_folder):
    text = Pipeline.from_config(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml", None, device="cpu")
    with pytest.raises(UserError, match="class labels are for class-conditional models"):
        text.generate("", steps=2, class_labels=[1])
    classes = Pipeline.from_config(class_folder / "config.yaml", class_folder / "model.ckpt", device="cpu")
    with pytest.raises(UserError, match="this model is class-conditional: give class labels"):
        classes.generate("a cat", steps=2)
    assert classes.generate("", steps=2, class_labels=4, n=2, scale=1.0).parameters(1).count("Class: 4") == 1


def test_class_conditional_sampling_runs_as_a_program(class_folder, tmp_path):
    args = ["-r", str(class_folder), "--classes", "2", "-n", "1", "-c", "2", "--scale", "2", "-l", str(tmp_path)]
    done = run_program("sample_diffusion.py", *args, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "Class: 2" in read_parameters(tmp_path / "img" / "00000.png")
