"""scripts/export_model.py: a training checkpoint becomes an inference model that loads anywhere."""

from pathlib import Path

import torch
from omegaconf import OmegaConf
from programs import run_program

from ldm.checkpoint import read_checkpoint
from ldm.util import apply_overrides, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_export_uses_ema_weights_in_fp16_and_drops_training_links(tmp_path, tiny_config):
    config = apply_overrides(tiny_config, ["model.params.use_ema=true"])
    model = instantiate_from_config(config.model, path="model")
    with torch.no_grad():
        for buffer in model.model_ema.buffers():
            if buffer.dim() > 0:
                buffer.fill_(0.5)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 10}, ckpt)
    config.model.params.first_stage_config.params.ckpt_path = str(tmp_path / "vae.ckpt")  # gone after export
    OmegaConf.save(config, tmp_path / "train.yaml")

    out = tmp_path / "export"
    args = ["--config", str(tmp_path / "train.yaml"), "--ckpt", str(ckpt), "--out", str(out), "--dtype", "fp16"]
    done = run_program("export_model.py", *args, "--vocabulary", "shapes")
    assert done.returncode == 0, done.stderr
    state_dict, _ = read_checkpoint(out / "model.safetensors")
    weight = state_dict["model.diffusion_model.out.2.weight"]
    assert weight.dtype == torch.float16 and bool((weight == 0.5).all())
    assert not any(k.startswith("model_ema.") for k in state_dict)
    assert state_dict["alphas_cumprod"].dtype == torch.float32, "the schedule is not a weight"
    torch.testing.assert_close(state_dict["alphas_cumprod"], model.alphas_cumprod, rtol=0, atol=0)
    exported = load_config(out / "config.yaml")
    assert "ckpt_path" not in exported.model.params.first_stage_config.params
    assert exported.model.params.use_ema is False and "circle" in exported.vocabulary

    again = run_program("export_model.py", *args)
    assert again.returncode == 2 and "pass --force" in again.stderr
