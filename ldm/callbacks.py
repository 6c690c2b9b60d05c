"""Lightning callbacks and plugins of ``main.py``: the logdir set-up, image grids, ``last.ckpt`` on signals and at the
end, the random generators' states, and checkpoint files written atomically."""

from __future__ import annotations

import errno
import math
import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.checkpoint import read_training_checkpoint
from ldm.errors import UserError
from ldm.files import TEMP_SUFFIX, atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside its destination, syncs it, then renames it into place, and
    reads checkpoints (``-r``) through :func:`ldm.checkpoint.read_training_checkpoint`, which runs no code in them.

    A crash or kill mid-write leaves the previous ``last.ckpt`` intact, never a truncated one. (Lightning's own
    writer stages the file in the system temp dir, whose move onto another file system is a plain copy.) Remote
    paths (``s3://...``) are written by Lightning's writer.
    """

    def __init__(self, preloaded: tuple[Path, dict[str, Any]] | None = None) -> None:
        super().__init__()
        # The resume checkpoint main.py has already read and checked: handed over instead of read a second time.
        self.preloaded = preloaded

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning moves the states to their devices itself; the tensors are read onto the CPU.
        if self.preloaded is not None and Path(path).resolve() == self.preloaded[0].resolve():
            checkpoint, self.preloaded = self.preloaded[1], None
            return checkpoint
        return read_training_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Raises :class:`DiskFullError` when the disk (or quota) is full."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as file:
                torch.save(checkpoint, file)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(err.errno, os.strerror(err.errno), str(path)) from err
            raise


class DiskFullError(OSError):
    """A checkpoint could not be written for want of space; ``filename`` is the checkpoint, and the file of that
    name (if any) is still the previous, complete one."""


def remove_partial_checkpoints(folder: Path) -> list[Path]:
    """Delete the temporary files an ``AtomicCheckpointIO`` killed mid-save left in ``folder``; returns them.

    Only a run writing into ``folder`` can be writing them, so call this before it saves anything.
    """
    partial = [path for path in folder.glob(f".*{TEMP_SUFFIX}") if path.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def rng_states() -> dict[str, Any]:
    """The states of the generators training draws from: torch's (CPU and the current CUDA device), numpy's and
    Python's, as tensors and plain values, which a weights-only checkpoint load reads back."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": (version, torch.tensor(python_state), gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (the CUDA state only where CUDA is in use)."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state.tolist()), gauss))
    if "cuda" in states and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block on a copy of the generators: what it draws leaves training's sequence unchanged."""
    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)


class TrainingRng(Callback):
    """Makes training draw the same random numbers (noise, timesteps, caption dropout, random crops) whether or not
    it was stopped and resumed, and whenever validation runs.

    Checkpoints carry the generators' states and a resumed run restores them before its first batch. Validation
    (and its sanity check) runs on a copy of them: a resumed run does not repeat the validation of the step it
    resumed at, so validation must not move training's sequence. All ranks are seeded alike and draw alike, so the
    states rank 0 saves are every rank's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.resumed: dict[str, Any] | None = None
        self.before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied at the start of training: the model and optimizer are set up in between.
        self.resumed = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resumed is not None:
            set_rng_states(self.resumed)
            self.resumed = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before_validation = rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before_validation is not None:
            set_rng_states(self.before_validation)
            self.before_validation = None


class SetupCallback(Callback):
    """Prepares the logdir when training (or testing) starts, on global rank 0: creates it and its ``checkpoints/``
    and ``configs/`` folders, deletes the temporary files of checkpoint saves a kill interrupted, and saves the run's
    merged configs as ``configs/<now>-project.yaml`` and ``configs/<now>-lightning.yaml``.

    ``main.py -r`` merges every saved pair in time order, so a resumed run starts from the configs it had. Nothing
    is saved before the run has restored its checkpoint and built its data: a resume that fails (say, with an
    override that changes the model) must not leave configs that make every later ``-r`` fail the same way.
    """

    def __init__(
        self,
        now: str,
        logdir: str | os.PathLike,
        ckptdir: str | os.PathLike,
        cfgdir: str | os.PathLike,
        config: DictConfig,
        lightning_config: DictConfig,
    ) -> None:
        super().__init__()
        self.now = now
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config = config
        self.lightning_config = lightning_config
        self.prepared = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer)

    def prepare(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero or self.prepared:
            return
        self.prepared = True
        for folder in (self.logdir, self.ckptdir, self.cfgdir):
            folder.mkdir(parents=True, exist_ok=True)
        for path in remove_partial_checkpoints(self.ckptdir):
            print(f"removed {path}, left by a checkpoint save that was interrupted", flush=True)
        OmegaConf.save(self.config, self.cfgdir / f"{self.now}-project.yaml")
        lightning = OmegaConf.create({"lightning": self.lightning_config})
        OmegaConf.save(lightning, self.cfgdir / f"{self.now}-lightning.yaml")


class ImageLogger(Callback):
    """Saves the image grids of ``pl_module.log_images(batch, N=max_images, split=..., **log_images_kwargs)`` as PNG
    files in ``<logdir>/images/train/`` and ``<logdir>/images/val/`` (and to TensorBoard when that is the logger).

    Training batches are logged every ``batch_frequency`` global steps and, with ``increase_log_steps``, also at
    steps 1, 2, 4, 8, ... below it; ``log_on_batch_idx`` counts batches of the epoch instead, and ``log_first_step``
    logs step 0 as well. Validation is logged once per validation run (its first batch), not in the sanity check.
    Each entry of the dict ``log_images`` returns, ``(N, 3, H, W)`` in [-1, 1], becomes
    ``<key>_gs-<global step>_e-<epoch>_b-<batch index>.png``, a grid 4 images wide; ``clamp`` clips to [-1, 1] first
    and ``rescale`` maps [-1, 1] to [0, 1]. Every rank computes the images (sharded models need all ranks for a
    forward pass); global rank 0 writes them.
    """

    def __init__(
        self,
        batch_frequency: int,
        max_images: int,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise UserError(f"batch_frequency must be at least 1, got {batch_frequency}.")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        if increase_log_steps:
            self.log_steps = [2**n for n in range(int(math.log2(batch_frequency)) + 1)]
        else:
            self.log_steps = [batch_frequency]

    def check_frequency(self, check_idx: int) -> bool:
        """Whether training step (or batch index) ``check_idx`` is one to log."""
        if check_idx == 0 and not self.log_first_step:
            return False
        if check_idx % self.batch_freq == 0 or check_idx in self.log_steps:
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    @torch.no_grad()
    def log_img(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str
    ) -> None:
        """Call ``log_images`` in eval mode, on a copy of the random generators (sampling must not change what
        training draws next), and write its grids."""
        if not callable(getattr(pl_module, "log_images", None)) or self.max_images <= 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            kwargs = {"N": self.max_images, **self.log_images_kwargs}
            with preserved_rng():
                images = pl_module.log_images(batch, split=split, **kwargs)
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            grids = {k: self.make_grid(v) for k, v in images.items() if isinstance(v, torch.Tensor) and v.ndim == 4}
            self.save_grids(trainer, grids, split, batch_idx)

    def make_grid(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) -> grid (3, H', W') in [0, 1] (or as given without ``rescale``), at most 4 wide."""
        images = images[: self.max_images].detach().float().cpu()
        if self.clamp:
            images = images.clamp(-1.0, 1.0)
        grid = torchvision.utils.make_grid(images, nrow=4)
        return (grid + 1.0) / 2.0 if self.rescale else grid

    def save_grids(self, trainer: pl.Trainer, grids: Mapping[str, torch.Tensor], split: str, batch_idx: int) -> None:
        folder = Path(trainer.default_root_dir) / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        step, epoch = trainer.global_step, trainer.current_epoch
        for key, grid in grids.items():
            pixels = (grid.clamp(0.0, 1.0).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            name = f"{key}_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(pixels).save(folder / name)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"{split}/{key}", grid.clamp(0.0, 1.0), step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.disabled:
            return
        check_idx = batch_idx if self.log_on_batch_idx else trainer.global_step
        if self.check_frequency(check_idx):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.disabled or trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0:
            return
        if trainer.global_step > 0 or self.log_first_step:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` without its save of ``last.ckpt`` when training ends, which ``LastCheckpoint`` makes.

    Lightning's own comes after it has counted an epoch stopped by ``max_steps`` as finished, so a run resumed from
    it would skip the rest of that epoch; ``LastCheckpoint`` saves the final step while it is still inside its epoch.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return


class LastCheckpoint(Checkpoint):
    """Keeps ``path`` (``checkpoints/last.ckpt``) current when a run stops or is asked to.

    - SIGUSR1: saved after the current training step, and training goes on (SLURM's ``--signal=USR1@<seconds>``
      sends it ahead of a job's time limit).
    - SIGTERM and Ctrl-C: saved, then the run stops. Lightning turns SIGTERM into a stop after the current step
      (``SIGTERMException``); Ctrl-C interrupts wherever it lands.
    - End of training: saved after the final step (``max_steps``) or, for other ends (``max_epochs``), when training
      ends; not again when ``ModelCheckpoint`` saved that step (its ``save_last`` writes ``last.ckpt`` with every
      periodic checkpoint).

    SIGKILL cannot be caught: ``main.py -r`` then resumes from the last periodic save. Being a ``Checkpoint``
    callback, Lightning runs it after the callbacks listed before it (give it after ``ModelCheckpoint``), so at the
    end it sees whether ``ModelCheckpoint`` has just saved.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self.requested = False
        self.saved_step: int | None = None
        self.previous_handler: Any = None
        self.installed = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
            return
        self.previous_handler = signal.getsignal(signal.SIGUSR1)

        def request(signum: int, frame: Any) -> None:
            self.requested = True
            if callable(self.previous_handler):
                self.previous_handler(signum, frame)

        signal.signal(signal.SIGUSR1, request)
        self.installed = True

    def restore_handler(self) -> None:
        if self.installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self.previous_handler)
            self.installed = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore_handler()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.saved_step = checkpoint.get("global_step")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            # The signal may reach one process only; saving is collective, so every rank must agree to save now.
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        # The final step is saved here rather than at the end of training: by then Lightning counts the epoch as
        # finished, and a run resumed from that checkpoint would skip the rest of it.
        final = 0 <= trainer.max_steps <= trainer.global_step and self.saved_step != trainer.global_step
        if requested or final:
            self.requested = False
            trainer.save_checkpoint(self.path)
        if requested:
            self.report(trainer, "SIGUSR1")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore_handler()  # Lightning skips the teardown hooks after an exception
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.sanity_checking:
            return
        if isinstance(trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            # Every rank holds the whole model, so rank 0 writes alone: after Ctrl-C the other ranks may be anywhere,
            # and the barriers of ``trainer.save_checkpoint`` could wait forever.
            # (Lightning has no public way to build a checkpoint without those barriers.)
            if trainer.is_global_zero:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint()
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
        else:
            trainer.save_checkpoint(self.path)
        self.report(trainer, "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C")

    def report(self, trainer: pl.Trainer, reason: str) -> None:
        if trainer.is_global_zero:
            print(f"{reason}: saved {self.path} at global step {trainer.global_step}", flush=True)
