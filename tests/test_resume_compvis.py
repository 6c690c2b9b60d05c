"""``main.py -r`` goes on with a logdir written by CompVis's ``main.py`` on PyTorch Lightning 1.x.

Such a logdir has a ``last.ckpt`` in Lightning 1.4's layout (no loop progress; callback states keyed by the callback
class, pickled as a reference to it) and configs naming ``main.DataModuleFromConfig`` / ``main.ImageLogger``, with
Lightning 1.x Trainer settings (``accelerator: ddp``, ``resume_from_checkpoint``). The test writes one from a short run
of the tiny shapes LDM, then resumes it.
"""

import argparse
import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")

BARE = [
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
    "data.params.validation=null",
    "lightning.callbacks.image_logger.params.disabled=true",
]
STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    argv = ["-b", CONFIG, "-t", "-l", str(logs), *BARE, f"lightning.trainer.max_steps={STEPS}"]
    assert main.main([*argv, "data.params.train.params.length=8"]) == 0
    (logdir,) = logs.iterdir()
    return logdir


def compvis_logdir(run: Path, folder: Path, extra_callbacks: dict | None = None) -> Path:
    """A copy of ``run`` as CompVis's main.py on Lightning 1.4 leaves a logdir that has been resumed once."""
    logdir = folder / "2022-08-01T10-00-00_shapes"
    (logdir / "configs").mkdir(parents=True)
    shutil.copytree(run / "checkpoints", logdir / "checkpoints")
    ckpt = logdir / "checkpoints" / "last.ckpt"
    project = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    project.data.target = "main.DataModuleFromConfig"
    project.data.params.validation = None
    OmegaConf.save(project, logdir / "configs" / "2022-08-01T10-00-00-project.yaml")
    compvis_lightning = {
        "lightning": {
            "callbacks": {
                "image_logger": {
                    "target": "main.ImageLogger",
                    "params": {"batch_frequency": 750, "max_images": 4, "increase_log_steps": False, "disabled": True},
                }
            },
            "trainer": {"benchmark": True, "resume_from_checkpoint": str(ckpt), "max_steps": STEPS},
        }
    }
    OmegaConf.save(OmegaConf.create(compvis_lightning), logdir / "configs" / "2022-08-01T10-00-00-lightning.yaml")

    current = torch.load(ckpt, map_location="cpu", weights_only=True)
    callbacks = {
        ModelCheckpoint: {
            "monitor": None,
            "best_model_score": None,
            "best_model_path": str(logdir / "checkpoints" / "epoch=000000.ckpt"),
            "current_score": None,
            "dirpath": str(logdir / "checkpoints"),
        },
        **(extra_callbacks or {}),
    }
    legacy = {
        "epoch": current["epoch"],
        "global_step": current["global_step"],
        "pytorch-lightning_version": "1.4.2",
        "state_dict": current["state_dict"],
        "optimizer_states": current["optimizer_states"],
        "lr_schedulers": current["lr_schedulers"],
        "callbacks": callbacks,
    }
    torch.save(legacy, ckpt)
    return logdir


def test_a_compvis_lightning_1_logdir_resumes(run, tmp_path, capsys, monkeypatch):
    restored = []
    load_state_dict = ModelCheckpoint.load_state_dict
    monkeypatch.setattr(
        ModelCheckpoint, "load_state_dict", lambda self, state: (restored.append(state), load_state_dict(self, state))
    )
    logdir = compvis_logdir(run, tmp_path, {EarlyStopping: {"wait_count": 0, "best_score": torch.tensor(1.0)}})
    ckpt = logdir / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "loops" not in before and ModelCheckpoint in before["callbacks"]

    assert main.main(["-r", str(logdir), "-t", *BARE, f"lightning.trainer.max_steps={STEPS + 2}"]) == 0
    err = capsys.readouterr().err
    assert "EarlyStopping callback, which this run does not have" in err
    after = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert after["global_step"] == STEPS + 2
    (adam,) = after["optimizer_states"]
    assert all(int(s["step"]) == STEPS + 2 for s in adam["state"].values()), "the optimizer went on, not restarted"
    changed = [
        k
        for k, v in before["state_dict"].items()
        if v.is_floating_point() and not torch.equal(v, after["state_dict"][k])
    ]
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert [state["best_model_path"] for state in restored] == [str(logdir / "checkpoints" / "epoch=000000.ckpt")]
    assert not any("EarlyStopping" in str(k) for k in after["callbacks"])


def test_lightning_1_trainer_settings_are_translated(tmp_path):
    opt = argparse.Namespace(**{name: None for name in main.TRAINER_FLAGS}, gpus=None, resume=str(tmp_path))
    settings = main.trainer_settings({"accelerator": "ddp", "benchmark": True, "resume_from_checkpoint": "x"}, opt)
    assert settings == {"strategy": "ddp", "benchmark": True}
    opt.resume = ""
    with pytest.raises(
        ConfigError, match=r"resume_from_checkpoint: Lightning 2 has no such setting; resume with main.py -r x"
    ):
        main.trainer_settings({"resume_from_checkpoint": "x"}, opt)
