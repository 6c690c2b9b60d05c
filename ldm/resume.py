"""What ``main.py -r`` resumes from: the newest complete checkpoint of a logdir, read and checked against the model
before anything is written to the logdir, so that a resume that cannot work fails in one line and leaves the run as
it was."""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.migration import migrate_checkpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import nn

from ldm.checkpoint import CheckpointError, read_training_checkpoint
from ldm.serialization import Ignored
from ldm.util import ConfigError

# What a Lightning checkpoint needs beyond the weights to go on training.
TRAINING_STATE = ("optimizer_states", "loops", "global_step")


@rank_zero_only
def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole zip archive, as ``torch.save`` writes checkpoints: the archive's directory comes
    last, so a file cut short has none. Reads the end of the file only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def find_resume_checkpoint(resume: Path) -> tuple[Path, Path]:
    """``(logdir, checkpoint)`` for ``-r``: a checkpoint inside ``<logdir>/checkpoints/``, or a logdir, whose newest
    complete checkpoint (``last.ckpt`` or a periodic one, by modification time) it resumes from."""
    if not resume.exists():
        raise ConfigError(f"cannot resume from '{resume}': it does not exist.")
    if resume.is_file():
        if resume.parent.name != "checkpoints":
            raise ConfigError(f"cannot resume from '{resume}': it is not in a logdir's checkpoints/ folder.")
        return resume.parent.parent, resume
    folder = resume / "checkpoints"
    # A kill between the periodic save and last.ckpt's leaves the periodic one newer; at a tie, last.ckpt.
    found = sorted(folder.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)
    for path in found:
        if is_complete(path):
            return resume, path
        warn(f"skipping '{path}': it is incomplete (cut short); trying the next newest checkpoint.")
    if found:
        raise ConfigError(f"cannot resume from '{resume}': none of its {len(found)} checkpoints is complete.")
    raise ConfigError(f"cannot resume from '{resume}': no checkpoints in {folder}.")


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, read by :func:`ldm.checkpoint.read_training_checkpoint` (nothing in it can run
    code); CheckpointError, naming the file and the way on, when it is not a whole training checkpoint."""
    try:
        checkpoint = read_training_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(
            f"cannot resume from '{path}': {err} Resume from another checkpoint (-r <logdir> takes the newest "
            "complete one)."
        ) from None
    return upgrade(checkpoint)


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` in the layout of the installed Lightning, by Lightning's own migrations.

    Checkpoints of Lightning 1.x (CompVis's ``main.py`` ran 1.4) have no loop progress: the migrations derive it from
    ``global_step`` and ``epoch``. Their callback states are keyed by class, which the safe reader leaves as inert
    stand-ins; :func:`adopt_callback_states` hands those states to the run's callbacks.
    """
    version = checkpoint.get("pytorch-lightning_version")
    if not isinstance(version, str) or not all(key in checkpoint for key in ("global_step", "epoch")):
        return checkpoint
    states = checkpoint.get("callbacks")
    by_class = {}
    if isinstance(states, dict):
        # Out of the way of the migrations, which take class keys for colliding ModelCheckpoint states.
        by_class = {key: states.pop(key) for key in [k for k in states if isinstance(k, type)]}
    migrate_checkpoint(checkpoint)
    if by_class:
        checkpoint["callbacks"].update(by_class)
    return checkpoint


def _class_names(callback: pl.Callback) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(callback).__mro__]


def adopt_callback_states(checkpoint: dict[str, Any], callbacks: list[pl.Callback]) -> None:
    """Key the callback states that Lightning 1.x saved by class under the ``state_key`` of the run's callback of
    that class (or a subclass: CompVis's ``ModelCheckpoint`` state goes to the run's periodic checkpoint), so that
    Lightning restores them; a state whose callback the run does not have is dropped with a warning."""
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return
    for key in [k for k in states if isinstance(k, type) and issubclass(k, Ignored)]:
        state = states.pop(key)
        owner = next((cb for cb in callbacks if key.original in _class_names(cb)), None)
        if owner is None:
            warn(f"the checkpoint holds the state of a {key.original} callback, which this run does not have.")
        else:
            states.setdefault(owner.state_key, state)


def check_resumable(checkpoint: Mapping[str, Any], model: nn.Module, path: Path, training: bool) -> None:
    """CheckpointError unless ``checkpoint`` holds a state for ``model`` as configured (same tensor names and shapes)
    and, to go on ``training``, the optimizer and loop states."""
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if training and missing:
        raise CheckpointError(
            f"cannot resume from '{path}': it holds weights but no training state ({', '.join(missing)}); to train "
            f"from its weights, start a new run with model.params.ckpt_path={path}."
        )
    saved, expected = checkpoint["state_dict"], model.state_dict()
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    strict = getattr(model, "strict_loading", True)  # as Lightning loads it
    absent = [k for k in expected if k not in saved] if strict else []
    unexpected = [k for k in saved if k not in expected] if strict else []
    if not (reshaped or absent or unexpected):
        return
    if reshaped:
        key = reshaped[0]
        example = f"e.g. {key}: {tuple(saved[key].shape)} in the file, {tuple(expected[key].shape)} in the model"
    else:
        example = f"e.g. {(absent or unexpected)[0]}"
    raise CheckpointError(
        f"cannot resume from '{path}': it does not fit the config ({len(reshaped)} tensors of other shapes, "
        f"{len(absent)} missing, {len(unexpected)} unexpected; {example}); resume with the configs it was trained "
        "with, without overrides that change the model."
    )
