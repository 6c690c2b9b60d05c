"""main.py end to end on the tiny shapes LDM (configs/latent-diffusion/shapes-tiny.yaml), on the CPU.

Python starts cost seconds (torch, Lightning, transformers), so most runs call ``main.main(argv)`` in this process;
real subprocesses are used where the test is about processes: a SIGKILL mid-run and a resume that is then stopped
with SIGUSR1 and SIGTERM. main.py's 2-process DDP run is in tests/test_captions_main.py, on a caption folder, where
it also checks that the ranks share the latent caching.
"""

import csv
import errno
import importlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.callbacks import AtomicCheckpointIO, ImageLogger
from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml")
AUTOENCODER = str(ROOT / "configs" / "autoencoder" / "autoencoder_kl_shapes_tiny.yaml")
FINETUNE = str(ROOT / "configs" / "stable-diffusion" / "v1-finetune.yaml")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
main = importlib.import_module("main")

QUIET = [
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
]
# Runs that are only about processes and checkpoints: no validation, no image grids.
BARE = [*QUIET, "data.params.validation=null", "lightning.callbacks.image_logger.params.disabled=true"]
SCHEDULER = [
    "model.params.scheduler_config.target=ldm.lr_scheduler.LambdaLinearScheduler",
    "model.params.scheduler_config.params.warm_up_steps=[5]",
    "model.params.scheduler_config.params.cycle_lengths=[1000000]",
    "model.params.scheduler_config.params.f_start=[0.1]",
    "model.params.scheduler_config.params.f_max=[1.0]",
    "model.params.scheduler_config.params.f_min=[1.0]",
]


def only_logdir(logs: Path) -> Path:
    runs = list(logs.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(node, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested checkpoint part, by dotted path."""
    if isinstance(node, torch.Tensor):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list | tuple) else ()
    return {path: t for key, value in items for path, t in tensors(value, f"{prefix}.{key}").items()}


def metric_rows(logdir: Path, version: int = 0) -> list[dict[str, str]]:
    with open(logdir / "csv" / f"version_{version}" / "metrics.csv") as file:
        return list(csv.DictReader(file))


# ---------------------------------------------------------------------------------------------------------------------
# One real training run: 30 steps on a single fixed batch of 8 images.


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[int, Path]:
    logs = tmp_path_factory.mktemp("logs")
    code = main.main(
        ["-b", CONFIG, "-t", "-l", str(logs), *QUIET,
         "lightning.trainer.max_steps=30",
         "data.params.train.params.length=8",  # one batch, the same every step
         "lightning.trainer.val_check_interval=15",
         "lightning.trainer.limit_val_batches=1",
         "lightning.modelcheckpoint.params.every_n_train_steps=10",
         "lightning.callbacks.image_logger.params.batch_frequency=15",
         "lightning.callbacks.image_logger.params.max_images=4"]
    )  # fmt: skip
    return code, only_logdir(logs)


def test_run_writes_the_logdir_layout(trained):
    code, logdir = trained
    assert code == 0
    assert logdir.name.endswith("_shapes-tiny")
    project = list((logdir / "configs").glob("*-project.yaml"))
    lightning = list((logdir / "configs").glob("*-lightning.yaml"))
    assert len(project) == len(lightning) == 1
    saved = OmegaConf.load(project[0])
    assert set(saved) == {"model", "data"} and saved.data.params.train.params.length == 8  # override applied
    assert OmegaConf.load(lightning[0]).lightning.trainer.max_steps == 30
    ckpts = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert ckpts == ["epoch=000029-step=000000030.ckpt", "last.ckpt"]  # no temp files left behind
    assert (logdir / "csv" / "version_0" / "metrics.csv").is_file()


def test_last_checkpoint_holds_the_final_state(trained):
    _, logdir = trained
    state = checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 30
    # The EMA may lag one update: a checkpoint saved at a step's end can precede the model's own end-of-step hook.
    assert int(state["state_dict"]["model_ema.num_updates"]) == 30
    assert "scale_factor" in state["state_dict"] and state["optimizer_states"]


def test_image_logger_writes_grids(trained):
    _, logdir = trained
    train = {p.name for p in (logdir / "images" / "train").glob("*.png")}
    for key in ("inputs", "reconstruction", "samples"):
        assert f"{key}_gs-000015_e-000014_b-000000.png" in train
        assert f"{key}_gs-000030_e-000029_b-000000.png" in train
    val = list((logdir / "images" / "val").glob("samples_gs-000015_*.png"))
    assert len(val) == 1
    from PIL import Image

    with Image.open(val[0]) as grid:
        assert grid.size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # 4 images of 32 px with make_grid's 2-px padding


def test_loss_goes_down_on_a_fixed_batch(trained):
    _, logdir = trained
    losses = [float(r["train/loss_simple_step"]) for r in metric_rows(logdir) if r.get("train/loss_simple_step")]
    assert len(losses) == 30
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first, losses


def test_autoencoder_config_trains_and_its_checkpoint_feeds_the_ldm(tmp_path):
    code = main.main(
        ["-b", AUTOENCODER, "-t", "-l", str(tmp_path / "ae"), *QUIET, "data.params.validation=null",
         "lightning.trainer.max_steps=4", "model.params.lossconfig.params.disc_start=1",
         "lightning.callbacks.image_logger.params.batch_frequency=2"]
    )  # fmt: skip
    assert code == 0
    run = only_logdir(tmp_path / "ae")
    for key in ("inputs", "reconstructions", "samples"):
        assert (run / "images" / "train" / f"{key}_gs-000002_e-000000_b-000000.png").is_file()
    autoencoder = checkpoint(run / "checkpoints" / "last.ckpt")
    assert autoencoder["global_step"] == 4 and len(autoencoder["optimizer_states"]) == 2  # with the discriminator
    assert any(k.startswith("loss.discriminator.") for k in autoencoder["state_dict"])

    first_stage = "model.params.first_stage_config.params"
    code = main.main(
        ["-b", CONFIG, "-t", "-l", str(tmp_path / "ldm"), *BARE, "lightning.trainer.max_steps=1",
         f"{first_stage}.ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"{first_stage}.ignore_keys=[loss]"]
    )  # fmt: skip
    assert code == 0
    ldm = checkpoint(only_logdir(tmp_path / "ldm") / "checkpoints" / "last.ckpt")["state_dict"]
    key = "decoder.conv_out.weight"
    assert torch.equal(ldm[f"first_stage_model.{key}"], autoencoder["state_dict"][key])


def test_finetune_config_builds_sd_on_a_caption_folder(tmp_path, reference_dir):
    from PIL import Image

    from ldm.util import instantiate_from_config, load_config

    for name in ("a", "b"):
        Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a photo of {name}")
    config = load_config(
        FINETUNE,
        ["model.params.ckpt_path=null", f"data.params.train.params.root={tmp_path}",
         "data.params.train.params.size=64", "data.params.num_workers=0"],
    )  # fmt: skip
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    expected = {line.split("\t")[0] for line in (reference_dir / "sd-v1-keys.tsv").read_text().splitlines()[1:]}
    assert set(model.state_dict()) == expected
    data = instantiate_from_config(config.data, path="data")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["jpg"].shape == (2, 64, 64, 3) and sorted(batch["txt"]) == ["a photo of a", "a photo of b"]


# ---------------------------------------------------------------------------------------------------------------------
# Kill, resume, signals (real processes)


class Output:
    """Collects a subprocess's merged stdout/stderr on a thread, so the test can wait for lines while it runs."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")))
        self.thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Output]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return process, Output(process)


def wait_for(condition, process: subprocess.Popen, output: Output, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            output.thread.join(5)
            pytest.fail(f"main.py exited ({process.returncode}) before {what}:\n{output.text[-3000:]}")
        time.sleep(0.2)
    process.kill()
    output.thread.join(5)
    pytest.fail(f"timed out waiting for {what}:\n{output.text[-3000:]}")


def periodic_steps(logdir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("step=", 1)[1]) for p in (logdir / "checkpoints").glob("epoch=*-step=*.ckpt"))


def test_resume_after_kill_then_sigusr1_and_sigterm(tmp_path):
    logs = tmp_path / "logs"
    endless = [*BARE, *SCHEDULER, "lightning.trainer.max_steps=100000",
               "lightning.modelcheckpoint.params.every_n_train_steps=5"]  # fmt: skip

    # 1. Train until a periodic checkpoint exists, then SIGKILL: nothing can be saved on the way out.
    process, output = start(["-b", CONFIG, "-t", "-l", str(logs), *endless], tmp_path)
    wait_for(lambda: logs.is_dir() and any(logs.iterdir()) and periodic_steps(only_logdir(logs)), process, output,
             "a periodic checkpoint")  # fmt: skip
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    output.thread.join(5)
    logdir = only_logdir(logs)
    _, resume_from = main.find_resume_checkpoint(logdir)
    killed_step = checkpoint(resume_from)["global_step"]
    assert killed_step >= 5 and killed_step % 5 == 0
    newest = periodic_steps(logdir)[-1]  # the kill may have come between the periodic file and last.ckpt

    # 2. Resume it; SIGUSR1 saves last.ckpt and training goes on; SIGTERM saves it and stops.
    process, output = start(["-r", str(logdir), "-t", *endless], tmp_path)
    wait_for(lambda: periodic_steps(logdir)[-1] > newest, process, output, "training to go on after resuming")
    process.send_signal(signal.SIGUSR1)
    wait_for(lambda: "SIGUSR1: saved" in output.text, process, output, "the SIGUSR1 checkpoint")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 143, output.text[-3000:]
    output.thread.join(5)
    said = [line for line in output.lines if line.startswith("SIGTERM: saved")]
    assert len(said) == 1, output.text[-3000:]
    final_step = int(said[0].rsplit(" ", 1)[1])
    assert final_step > killed_step

    # The resumed run went on from the killed run's step, with its optimizer, LR schedule and EMA.
    state = checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert state["global_step"] == final_step
    assert int(state["state_dict"]["model_ema.num_updates"]) == final_step  # counted from before the kill
    assert int(state["optimizer_states"][0]["state"][0]["step"]) == final_step
    assert state["lr_schedulers"][0]["last_epoch"] == final_step
    resumed_steps = [int(r["step"]) for r in metric_rows(logdir, version=1)]
    assert min(resumed_steps) >= killed_step - 1 and max(resumed_steps) < final_step
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 2  # each run saved its configs


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    # 2 batches an epoch: the stop at step 3 falls mid-epoch and the resumed run crosses into the next epoch.
    # Validation at step 3 runs after the stopped run's last save, and the resumed run logs image grids at other
    # steps than the uninterrupted one: neither may change what training draws.
    run = [*QUIET, "data.params.train.params.length=16",
           "lightning.trainer.val_check_interval=3", "lightning.trainer.limit_val_batches=1",
           "lightning.callbacks.image_logger.params.batch_frequency=3",
           "lightning.callbacks.image_logger.params.max_images=2"]  # fmt: skip
    assert main.main(["-b", CONFIG, "-t", "-l", str(tmp_path / "straight"), *run, "lightning.trainer.max_steps=5"]) == 0
    assert main.main(["-b", CONFIG, "-t", "-l", str(tmp_path / "stopped"), *run, "lightning.trainer.max_steps=3"]) == 0
    logdir = only_logdir(tmp_path / "stopped")
    more_grids = "lightning.callbacks.image_logger.params.batch_frequency=1"
    assert main.main(["-r", str(logdir), "-t", *run, more_grids, "lightning.trainer.max_steps=5"]) == 0

    straight = checkpoint(only_logdir(tmp_path / "straight") / "checkpoints" / "last.ckpt")
    resumed = checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == resumed["global_step"] == 5 and straight["epoch"] == resumed["epoch"] == 2
    for part in ("state_dict", "optimizer_states"):
        expected, actual = tensors(straight[part]), tensors(resumed[part])
        differ = [key for key, value in expected.items() if not torch.equal(value, actual[key])]
        assert expected.keys() == actual.keys() and not differ, f"{part}: {len(differ)} of {len(expected)} differ"


class InterruptAt(pl.Callback):
    """Raises KeyboardInterrupt after training step ``step``, as Ctrl-C landing there would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_last_checkpoint(tmp_path, capsys):
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores further Ctrl-C while it shuts down
    try:
        with pytest.raises(SystemExit):
            main.main(["-b", CONFIG, "-t", "-l", str(tmp_path), *BARE, "lightning.trainer.max_steps=50",
                       "lightning.callbacks.interrupt.target=test_main.InterruptAt",
                       "lightning.callbacks.interrupt.params.step=3"])  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, sigint)
    last = only_logdir(tmp_path) / "checkpoints" / "last.ckpt"
    assert checkpoint(last)["global_step"] == 3
    assert f"Ctrl-C: saved {last} at global step 3" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written


def run_failing(capsys, logs: Path, *argv: str) -> str:
    code = main.main(["-l", str(logs), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert not logs.exists() or not any(logs.iterdir())
    return lines[0]


def test_bad_configs_give_one_line_errors(tmp_path, capsys):
    logs = tmp_path / "logs"
    no_data = tmp_path / "no-data.yaml"
    config = OmegaConf.load(CONFIG)
    del config["data"]
    OmegaConf.save(config, no_data)
    assert "no 'data' section" in run_failing(capsys, logs, "-b", str(no_data), "-t")
    assert "config file 'missing.yaml' does not exist" in run_failing(capsys, logs, "-b", "missing.yaml", "-t")
    typo = "model.params.unet_config.target=ldm.modules.diffusionmodules.openaimodel.UNetModle"
    line = run_failing(capsys, logs, "-b", CONFIG, "-t", typo)
    assert "model.params.unet_config.target" in line and "'UNetModel'" in line
    line = run_failing(capsys, logs, "-b", CONFIG, "-t", "model.params.unet_config.params.model_channel=8")
    assert "model.params.unet_config.params.model_channel" in line and "'model_channels'" in line
    line = run_failing(capsys, logs, "-b", CONFIG, "-t", "lightning.trainer.max_step=3")
    assert "lightning.trainer.max_step" in line and "'max_steps'" in line
    line = run_failing(capsys, logs, "-b", CONFIG, "-t", "data.params.train.params.split=everything")
    assert "data.params.train" in line and "everything" in line
    assert "nothing to do" in run_failing(capsys, logs, "-b", CONFIG)
    assert "cannot resume" in run_failing(capsys, logs, "-r", str(tmp_path / "no-such-run"), "-t")
    line = run_failing(capsys, logs, "-b", FINETUNE, "-t", "model.params.ckpt_path=no/such/model.ckpt")
    assert line == "error: model.params.ckpt_path: checkpoint 'no/such/model.ckpt' does not exist."


def test_run_names_cannot_leave_the_logdir(tmp_path, capsys):
    for flag, value in (("-n", "/../../x"), ("-n", "../x"), ("-f", "/../y"), ("-n", "a\0b")):
        line = run_failing(capsys, tmp_path / "logs", "-b", CONFIG, "-t", flag, value)
        assert f"must be a name, not a path: got {value!r}" in line and "-l/--logdir" in line
    assert not any(tmp_path.iterdir())


@pytest.fixture
def resumable(trained, tmp_path) -> Path:
    """A copy of the trained run's logdir (modification times kept), to resume."""
    _, logdir = trained
    return Path(shutil.copytree(logdir, tmp_path / logdir.name))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


class RunsCode:
    """Pickles to a call of ``open(path, "w")``: loading it unsafely creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def resume_failing(capsys, *argv: str) -> str:
    code = main.main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_resume_that_cannot_work_fails_in_one_line_and_writes_nothing(resumable, tmp_path, capsys):
    ckpts = resumable / "checkpoints"
    before = snapshot(resumable)
    line = resume_failing(capsys, "-r", str(resumable), "-t", "model.params.unet_config.params.model_channels=64")
    assert f"'{ckpts / 'last.ckpt'}'" in line and "does not fit the config" in line
    assert snapshot(resumable) == before  # no configs saved: a plain -r still works (below)

    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (ckpts / "empty.ckpt").write_bytes(b"")
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, ckpts / "payload.ckpt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ckpts / "script.ckpt"))
    torch.save({"state_dict": checkpoint(ckpts / "last.ckpt")["state_dict"]}, ckpts / "weights.ckpt")
    before = snapshot(resumable)
    for name in ("truncated.ckpt", "empty.ckpt", "payload.ckpt", "script.ckpt", "weights.ckpt"):
        assert str(ckpts / name) in resume_failing(capsys, "-r", str(ckpts / name), "-t")  # names the file
    assert snapshot(resumable) == before and not marker.exists()
    for name in ("truncated.ckpt", "empty.ckpt", "payload.ckpt", "script.ckpt", "weights.ckpt"):
        (ckpts / name).unlink()

    (ckpts / ".last.ckpt.k2j4h5g6.tmp").write_bytes(data[:1000])  # left by a kill mid-save
    assert main.main(["-r", str(resumable), "-t", *BARE, "lightning.trainer.max_steps=31"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=000029-step=000000030.ckpt", "last.ckpt"]
    assert checkpoint(ckpts / "last.ckpt")["global_step"] == 31
    assert len(list((resumable / "configs").glob("*-project.yaml"))) == 2


def test_a_checkpoint_lightning_cannot_load_fails_in_one_line(resumable, capsys, monkeypatch):
    def unreadable(self, path, *args, **kwargs):
        raise CheckpointError(f"cannot resume from '{path}': unreadable.")

    monkeypatch.setattr(main, "check_resumable", lambda *args, **kwargs: None)  # as if it changed after the check
    monkeypatch.setattr(AtomicCheckpointIO, "load_checkpoint", unreadable)
    before = snapshot(resumable / "configs")
    line = resume_failing(capsys, "-r", str(resumable), "-t", *BARE, "lightning.trainer.max_steps=31")
    assert line == f"error: cannot resume from '{resumable / 'checkpoints' / 'last.ckpt'}': unreadable."
    assert snapshot(resumable / "configs") == before


def test_a_full_disk_during_a_checkpoint_leaves_last_ckpt_intact(tmp_path, capsys, monkeypatch):
    save = torch.save

    def full_after_two(obj, file) -> None:  # step 1's periodic checkpoint and last.ckpt fit; step 2's does not
        full_after_two.calls += 1
        if full_after_two.calls <= 2:
            return save(obj, file)
        file.write(b"the start of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    full_after_two.calls = 0
    monkeypatch.setattr(torch, "save", full_after_two)
    code = main.main(["-b", CONFIG, "-t", "-l", str(tmp_path), *BARE, "lightning.trainer.max_steps=3",
                      "lightning.modelcheckpoint.params.every_n_train_steps=1"])  # fmt: skip
    monkeypatch.undo()
    logdir = only_logdir(tmp_path)
    ckpts = logdir / "checkpoints"
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 1 and errors == [
        f"error: the disk is full: checkpoint '{ckpts / 'epoch=000000-step=000000002.ckpt'}' could not be written "
        f"(No space left on device); {ckpts / 'last.ckpt'} is intact, as of its previous save. Free some space, then "
        f"go on with main.py -r {logdir} -t."
    ]
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=000000-step=000000001.ckpt", "last.ckpt"]
    assert checkpoint(ckpts / "last.ckpt")["global_step"] == 1


def test_tensorboard_logger_needs_its_package(tmp_path, capsys):
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    line = run_failing(capsys, tmp_path / "logs", "-b", CONFIG, "-t", "lightning.logger=tensorboard")
    assert line.startswith("error: lightning.logger:") and "tensorboard" in line


def test_usage_errors_are_one_line(capsys):
    assert main.main(["-b", CONFIG, "-t", "--no-such-flag"]) == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --no-such-flag")
    assert main.main(["-r", "logs/x", "-n", "name"]) == 2
    assert "cannot both be given" in capsys.readouterr().err
    assert main.main([]) == 2
    assert "-b/--base" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Pieces


def test_flags_and_overrides_parse_as_compvis_commands_are_written():
    opt, overrides = main.parse_args(["--base", "a.yaml", "b.yaml", "-t", "x.y=1", "z=2"])
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train and overrides == ["x.y=1", "z=2"]
    opt, overrides = main.parse_args(["-b", "a.yaml", "k=v", "-t", "false", "--scale_lr", "False"])
    assert not opt.train and not opt.scale_lr and overrides == ["k=v"] and opt.base == ["a.yaml"]
    opt, _ = main.parse_args(["-b", "a.yaml", "--gpus", "0,", "--precision", "16", "--max_steps", "7"])
    settings = main.trainer_settings({"max_steps": 1, "benchmark": True}, opt)
    assert settings == {"accelerator": "gpu", "devices": [0], "precision": 16, "max_steps": 7, "benchmark": True}
    opt, _ = main.parse_args(["-b", "a.yaml", "--devices", "0,1", "--num_nodes", "2", "--strategy", "fsdp"])
    assert main.trainer_settings({}, opt) == {"devices": [0, 1], "num_nodes": 2, "strategy": "fsdp"}
    opt, _ = main.parse_args(["-b", "a.yaml"])
    assert main.trainer_settings({"gpus": "0,1"}, opt) == {"accelerator": "gpu", "devices": [0, 1]}


def test_learning_rate_is_scaled_by_the_effective_batch(capsys):
    model = SimpleNamespace()
    config = OmegaConf.create({"model": {"base_learning_rate": 1e-4}})
    trainer = SimpleNamespace(accumulate_grad_batches=2, num_devices=4, num_nodes=3)
    main.set_learning_rate(model, config, SimpleNamespace(batch_size=8), trainer, scale_lr=True)
    assert model.learning_rate == pytest.approx(2 * 4 * 3 * 8 * 1e-4)
    out = capsys.readouterr().out
    assert "= 2 (accumulate_grad_batches) * 4 (devices) * 3 (num_nodes) * 8 (batch_size) * 1.00e-04" in out
    main.set_learning_rate(model, config, SimpleNamespace(batch_size=8), trainer, scale_lr=False)
    assert model.learning_rate == 1e-4


def test_image_logger_frequency_follows_compvis():
    def logged(**kwargs) -> list[int]:
        logger = ImageLogger(batch_frequency=8, max_images=4, **kwargs)
        return [step for step in range(20) if logger.check_frequency(step)]

    assert logged() == [1, 2, 4, 8, 16]
    assert logged(increase_log_steps=False) == [8, 16]
    assert logged(increase_log_steps=False, log_first_step=True) == [0, 8, 16]


def test_resume_takes_the_newest_complete_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    now = time.time_ns()
    for age, name in enumerate(["epoch=0-step=15.ckpt", "last.ckpt", "epoch=0-step=10.ckpt"]):
        torch.save({"global_step": 0}, run / "checkpoints" / name)
        os.utime(run / "checkpoints" / name, ns=(now - age * 10**9,) * 2)
    newest = run / "checkpoints" / "epoch=0-step=15.ckpt"
    assert main.find_resume_checkpoint(run) == (run, newest)  # killed between the periodic save and last.ckpt's
    with open(newest, "r+b") as file:
        file.truncate(100)
    os.utime(newest, ns=(now, now))
    assert main.find_resume_checkpoint(run) == (run, run / "checkpoints" / "last.ckpt")
    assert f"warning: skipping '{newest}': it is incomplete" in capsys.readouterr().err
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"")
    with pytest.raises(ConfigError, match="none of its 3 checkpoints is complete"):
        main.find_resume_checkpoint(run)


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {}}, path)

    def crash(obj, file):  # a process dying halfway through writing
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "state_dict": {}}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
