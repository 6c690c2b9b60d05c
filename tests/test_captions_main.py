"""main.py trains the tiny shapes LDM on a test-written caption folder of mixed aspect ratios, with kohya's buckets
and latent caching: the VAE encodes each image once before training and never during it, a second run finds every
latent cached, and the shipped configs' data sections build on such a folder."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_captions import write_image
from test_main import QUIET, checkpoint, main, only_logdir

from ldm.data.base import DataModuleFromConfig
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml"
FINETUNE = ROOT / "configs" / "stable-diffusion" / "v1-finetune.yaml"
CAPTIONS = ROOT / "configs" / "stable-diffusion" / "v1-finetune-captions.yaml"
LORA_DATA = ROOT / "configs" / "lora" / "data-caption-folder.yaml"
PRIOR_DATA = ROOT / "configs" / "lora" / "data-prior-preservation.yaml"
# (width, height): buckets of a 128^2 budget in steps of 64 are 64x192, 64x256, 128x128, 192x64 and 256x64.
SIZES = [(200, 70), (210, 66), (60, 180), (64, 200), (130, 120), (128, 128)]


def caption_folder(root: Path) -> Path:
    for i, size in enumerate(SIZES):
        write_image(root / "2_a shape" / f"{i}.png", size, seed=i)
    (root / "2_a shape" / "0.txt").write_text("a red circle", encoding="utf-8")
    return root


def tiny_config(tmp_path: Path, data_root: Path) -> Path:
    config = OmegaConf.load(TINY)
    config.data = {
        "target": "ldm.data.base.DataModuleFromConfig",
        "params": {
            "batch_size": 2,
            "num_workers": 0,
            "train": {
                "target": "ldm.data.captions.KohyaFolder",
                "params": {
                    "root": str(data_root),
                    "resolution": 128,
                    "min_bucket_reso": 64,
                    "max_bucket_reso": 256,
                    "cache_latents": True,
                },
            },
        },
    }
    path = tmp_path / "captions-tiny.yaml"
    OmegaConf.save(config, path)
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(num_workers|LeafSpec|eval mode|val_dataloader).*")
def test_main_trains_on_buckets_from_cached_latents(tmp_path, monkeypatch):
    data_root = caption_folder(tmp_path / "data")
    config = tiny_config(tmp_path, data_root)
    calls: list[tuple[int, ...]] = []
    encode = LatentDiffusion.encode_first_stage

    def counted(self, x):
        calls.append(tuple(x.shape))
        return encode(self, x)

    monkeypatch.setattr(LatentDiffusion, "encode_first_stage", counted)
    overrides = [*QUIET, "lightning.callbacks.image_logger.params.disabled=true", "lightning.trainer.max_steps=4"]
    logs = tmp_path / "logs"
    assert main.main(["-b", str(config), "-t", "-l", str(logs), *overrides]) == 0
    state = checkpoint(only_logdir(logs) / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4
    # Caching only: one VAE batch per bucket (each under 4 images), none in training or for scale_by_std.
    assert sum(shape[0] for shape in calls) == len(SIZES)
    assert {shape[2:] for shape in calls} == {(64, 192), (192, 64), (128, 128)}
    assert len(list((data_root / ".latent-cache").glob("*.safetensors"))) == len(SIZES)
    assert float(state["state_dict"]["scale_factor"]) != 1.0  # measured on the first (cached) batch

    calls.clear()
    logs2 = tmp_path / "logs2"
    assert main.main(["-b", str(config), "-t", "-l", str(logs2), *overrides, "lightning.trainer.max_steps=1"]) == 0
    assert calls == []  # every latent was a cache hit


def test_shipped_configs_build_their_data_on_a_caption_folder(tmp_path):
    data_root = caption_folder(tmp_path / "data")
    captions = load_config(CAPTIONS, [f"data.params.train.params.root={data_root}"])
    assert captions.model == load_config(FINETUNE).model  # the same SD 1.x fine-tuning model
    model_only = tmp_path / "model.yaml"
    OmegaConf.save({"model": OmegaConf.load(TINY).model}, model_only)
    lora = load_config([model_only, LORA_DATA], [f"data.params.train.params.root={data_root}"])
    for config in (captions, lora):
        data = instantiate_from_config(config.data)
        assert isinstance(data, DataModuleFromConfig)
        data.setup()
        dataset = data.datasets["train"]
        assert len(dataset) == 2 * len(SIZES) and dataset.cache is not None
        assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in dataset.bucket_keys())
    class_root = tmp_path / "class"
    for i in range(3):
        write_image(class_root / f"{i}.png", (96, 96), seed=20 + i)
    prior = load_config(
        [model_only, PRIOR_DATA],
        [
            f"data.params.train.params.instance.root={data_root}",
            f"data.params.train.params.class_data_root={class_root}",
            "data.params.train.params.num_class_images=3",
        ],
    )
    assert prior.model.params.prior_loss_weight == 1.0
    data = instantiate_from_config(prior.data)
    data.setup()
    assert len(data.datasets["train"]) == 2 * len(SIZES)


@pytest.mark.slow
def test_ddp_two_processes_share_the_caching_the_buckets_and_one_logdir(tmp_path):
    """main.py's one DDP run (each costs tens of seconds here): two processes on the CPU, each encodes its share of
    the images, both train on one-bucket batches of their own, with the learning rate scaled by both processes'
    batches, and rank 0 alone writes the logdir."""
    data_root = caption_folder(tmp_path / "data")
    config = tiny_config(tmp_path, data_root)
    logs = tmp_path / "logs"
    overrides = [*QUIET, "lightning.callbacks.image_logger.params.disabled=true", "lightning.trainer.max_steps=2"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-b", str(config), "-t", "-l", str(logs),
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "[rank 0] finished at global step 2" in out and "[rank 1] finished at global step 2" in out
    assert "2 (devices)" in out
    logdir = only_logdir(logs)  # rank 1 wrote into rank 0's logdir
    assert [p.name for p in (logdir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert checkpoint(logdir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert len(list((data_root / ".latent-cache").glob("*.safetensors"))) == len(SIZES)
    assert all(p.suffix == ".safetensors" for p in (data_root / ".latent-cache").iterdir())  # no temp files left


def test_main_reports_a_bad_caption_folder_in_one_line(tmp_path, capsys):
    data_root = tmp_path / "data"
    write_image(data_root / "2_a shape" / "ok.png", (64, 64))
    (data_root / "2_a shape" / "broken.png").write_bytes(b"not an image")
    config = tiny_config(tmp_path, data_root)
    assert main.main(["-b", str(config), "-t", "-l", str(tmp_path / "logs"), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.params.train" in err and "broken.png' is not a readable image" in err
