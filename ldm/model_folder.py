"""Where a model's config and checkpoint are, given a checkpoint or a folder: CompVis's model folders
(``models/ldm/<name>/config.yaml`` + ``model.ckpt``) and this project's training logdirs (``configs/*-project.yaml``
+ ``checkpoints/last.ckpt``). The ``-r`` of ``scripts/sample_diffusion.py`` and ``scripts/superres.py``."""

from __future__ import annotations

from pathlib import Path

from ldm.errors import UserError


def find_model(resume: str) -> tuple[Path, Path, Path]:
    """(logdir, config, checkpoint) for ``resume``: a checkpoint file or a folder holding one."""
    path = Path(resume)
    if path.is_file():
        ckpt = path
        logdir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    elif path.is_dir():
        logdir = path
        ckpt = next((c for c in (path / "model.ckpt", path / "checkpoints" / "last.ckpt") if c.is_file()), None)
        if ckpt is None:
            raise UserError(f"'{resume}' holds neither model.ckpt nor checkpoints/last.ckpt; give the checkpoint.")
    else:
        raise UserError(f"-r '{resume}' does not exist; give a checkpoint or the folder holding one.")
    configs = [logdir / "config.yaml"] if (logdir / "config.yaml").is_file() else []
    configs = configs or sorted((logdir / "configs").glob("*-project.yaml"))
    if not configs:
        raise UserError(f"no config.yaml or configs/*-project.yaml in '{logdir}', beside the checkpoint.")
    return logdir, configs[-1], ckpt
