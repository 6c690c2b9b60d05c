"""The README's recipe end to end: train on your own caption folder, export, and sample from the export.

It runs the real commands in this process (Python starts cost seconds), on a folder of 8 captioned images, with the
recipe's config made tiny by overrides: 2 training steps from the bundled demo model.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm import cli
from ldm.outputs import read_parameters
from ldm.util import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "latent-diffusion" / "caption-folder-ldm.yaml"
DEMO = ROOT / "models" / "ldm" / "shapes" / "model.safetensors"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def caption_folder(root: Path) -> Path:
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    for i, (name, rgb) in enumerate([*colours.items(), *colours.items()]):
        image = Image.new("RGB", (64, 64), (255, 255, 255) if i < 4 else (0, 0, 0))
        image.paste(rgb, (16, 16, 48, 48))
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {name} square on a {'white' if i < 4 else 'black'} background")
    return root


@pytest.mark.skipif(not DEMO.is_file(), reason="the recipe starts from the bundled demo model (models/ldm/shapes/)")
def test_train_on_a_caption_folder_export_and_sample(tmp_path, capsys):
    (tmp_path / "captions").mkdir()
    folder = caption_folder(tmp_path / "captions")
    logs = tmp_path / "logs"
    code = main.main([
        "-b", str(CONFIG), "-t", "-n", "mine", "-l", str(logs),
        f"data.params.train.params.root={folder}", f"model.params.ckpt_path={DEMO}",
        "data.params.batch_size=2", "data.params.num_workers=0", "data.params.validation=null",
        "lightning.trainer.max_steps=2", "lightning.trainer.enable_progress_bar=false",
        "lightning.trainer.enable_model_summary=false", "lightning.callbacks.image_logger.params.disabled=true",
    ])  # fmt: skip
    assert code == 0
    run = next(logs.iterdir())
    project = next((run / "configs").glob("*-project.yaml"))

    export = tmp_path / "mine"
    args = ["--config", str(project), "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(export)]
    assert _script("export_model").main([*args, "--vocabulary", str(folder), "--dtype", "fp16"]) == 0
    vocabulary = load_config(export / "config.yaml").vocabulary
    assert {"red", "square", "black", "background"} <= set(vocabulary) and "circle" not in vocabulary

    out = tmp_path / "samples"
    code = cli.main("txt2img", [
        "--config", str(export / "config.yaml"), "--ckpt", str(export / "model.safetensors"),
        "--prompt", "a red square on a black circle", "--steps", "3", "--n_samples", "1", "--n_iter", "1",
        "--skip_grid", "--outdir", str(out), "--device", "cpu", "--precision", "full",
    ])  # fmt: skip
    assert code == 0
    assert "warning: this model was trained on a small vocabulary; it does not know circle" in capsys.readouterr().err
    sample = out / "samples" / "00000.png"
    assert Image.open(sample).size == (64, 64)
    assert read_parameters(sample).startswith("a red square on a black circle\nSteps: 3, Sampler: DDIM")


def test_export_vocabularies(tmp_path):
    export_model = _script("export_model")
    words = tmp_path / "words.txt"
    words.write_text("Fox, HOUND\nfox owl")
    assert export_model.vocabulary_of(str(words)) == ["fox", "hound", "owl"]
    assert export_model.vocabulary_of("none") is None
    assert "circle" in export_model.vocabulary_of("shapes")
    (tmp_path / "empty.txt").write_text("  ,. \n")
    with pytest.raises(ValueError, match="holds no words"):
        export_model.vocabulary_of(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="is none of: none, shapes, a caption folder, a text file"):
        export_model.vocabulary_of(str(tmp_path / "nowhere"))
