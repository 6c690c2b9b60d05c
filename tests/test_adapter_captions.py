"""LoRA and textual-inversion training through main.py on a kohya caption folder of mixed aspect ratios, with
aspect-ratio buckets and cached latents (``configs/lora/data-caption-folder.yaml`` merged after the model config):
the tiny SD 1.x model trains for 2 steps, the adapter moves off its start and the kohya / A1111 file it writes
reloads through the project's loaders. Kept small (64-pixel budget, 2 steps) so that each run takes seconds."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.adapters.embeddings import attach_embeddings, load_embeddings
from ldm.adapters.lora import LoraMerger, read_lora
from ldm.prompts import encode_prompts

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")
DATA = ROOT / "configs" / "lora" / "data-caption-folder.yaml"
# (width, height): with a 64^2 budget in steps of 32 the buckets are 32x128, 64x64 and 128x32 (latents 16x64 ...).
SIZES = [(120, 30), (30, 120), (64, 64), (70, 60)]
STEPS = 2
RUN = [
    "data.params.train.params.resolution=64",
    "data.params.train.params.min_bucket_reso=32",
    "data.params.train.params.max_bucket_reso=128",
    "data.params.train.params.bucket_reso_steps=32",
    "data.params.batch_size=2",
    "data.params.num_workers=0",
    f"lightning.trainer.max_steps={STEPS}",
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.callbacks.image_logger.target=ldm.callbacks.ImageLogger",
    "lightning.callbacks.image_logger.params.disabled=true",
]


def kohya_folder(root: Path) -> Path:
    """``1_a shape/``: images of SIZES, one with its own caption file (the others take the folder's caption)."""
    folder = root / "1_a shape"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a red stripe", encoding="utf-8")
    return root


def run(tiny_config, tiny_dir: Path, tmp_path: Path, model: dict) -> Path:
    """main.py with the tiny model as ``model`` (a CaptionFolder data section of its own, which the kohya data
    config replaces) and the kohya folder; returns the logdir."""
    data = kohya_folder(tmp_path / "data")
    model["params"]["ckpt_path"] = str(tiny_dir / "model.safetensors")
    own_data = {"target": "ldm.data.folder.CaptionFolder", "params": {"root": "elsewhere", "size": 512}}
    config = OmegaConf.merge(tiny_config, {"model": model, "data": {"params": {"train": own_data}}})
    path = tmp_path / "model.yaml"
    OmegaConf.save(config, path)
    args = ["-b", str(path), str(DATA), "-t", "-l", str(tmp_path / "logs"), f"data.params.train.params.root={data}"]
    assert main.main([*args, *RUN]) == 0
    (logdir,) = (tmp_path / "logs").iterdir()
    cached = list((data / ".latent-cache").glob("*.safetensors"))
    assert len(cached) == len(SIZES)  # every image encoded once, in its bucket
    with next(logdir.glob("csv/*/metrics.csv")).open() as file:
        losses = [float(row["train/loss_step"]) for row in csv.DictReader(file) if row["train/loss_step"]]
    assert len(losses) == STEPS and all(np.isfinite(losses)), losses
    return logdir


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(num_workers|LeafSpec|eval mode|val_dataloader|weights_only).*")
def test_lora_trains_on_buckets_of_cached_latents(tiny_config, tiny_dir, tiny_model, tmp_path):
    model = {
        "target": "ldm.adapters.lora_training.LoraLatentDiffusion",
        "base_learning_rate": 1.0e-2,
        "params": {"lora_config": {"rank": 4, "name": "tiny", "save_dtype": "float32"}},
    }
    logdir = run(tiny_config, tiny_dir, tmp_path, model)
    lora = read_lora(logdir / "lora" / "tiny.safetensors")
    assert len(lora.modules) == 6 * 12 and all(name.startswith("lora_unet_") for name in lora.modules)
    # The up weights start at zero: after 2 steps every one has moved, so merging the file changes each layer.
    assert all(m["lora_up.weight"].abs().sum() > 0 for m in lora.modules.values())
    merger = LoraMerger(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    merger.apply([(lora, 1.0, 1.0)])
    try:
        changed = [k for k, v in tiny_model.model.state_dict().items() if not torch.equal(v, before[k])]
    finally:
        merger.restore()
    assert len(changed) == 6 * 12, len(changed)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(num_workers|LeafSpec|eval mode|val_dataloader|weights_only).*")
def test_textual_inversion_trains_on_buckets_of_cached_latents(tiny_config, tiny_dir, tiny_model, tmp_path):
    model = {
        "target": "ldm.adapters.ti_training.TextualInversionDiffusion",
        "base_learning_rate": 0.05,
        "params": {"embedding_name": "stripe", "init_text": "blue", "templates": ["a photo of [name], [filewords]"]},
    }
    logdir = run(tiny_config, tiny_dir, tmp_path, model)
    embeddings = {e.name: e for e in load_embeddings(logdir / "embeddings")}
    assert set(embeddings) == {"stripe", f"stripe-{STEPS}"}
    embedding = embeddings["stripe"]
    encoder = tiny_model.cond_stage_model
    start = encoder.token_embedding.weight[encoder.tokenizer.encode("blue")]
    assert embedding.step == STEPS and embedding.vectors[None].shape == start.shape
    assert not torch.allclose(embedding.vectors[None], start)  # the vector moved off init_text's
    plain = encode_prompts(tiny_model, ["a photo of stripe"])[0]
    attach_embeddings(tiny_model, [embedding])
    try:
        with_file = encode_prompts(tiny_model, ["a photo of stripe"])[0]
    finally:
        attach_embeddings(tiny_model, [])
    assert not torch.allclose(with_file, plain)
