"""Class images for DreamBooth prior preservation, generated with the model being trained: where a
:class:`~ldm.data.prior.PriorPreservation` folder holds fewer than ``num_class_images`` images, the rest are made from
``class_prompt`` before training starts (diffusers' DreamBooth behaviour) through :class:`ldm.inference.Pipeline`,
and saved into ``class_data_root`` as ``class-NNNNN.png`` with A1111's infotext (so PNG Info gives each one's seed
and settings, and a later run finds the folder full).

Image ``class-N`` has seed N, so a run stopped while generating makes the same images when started again. With
several processes each generates its share of the missing images, and all wait for the others before reading the
folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from ldm.data.prior import PriorPreservation
from ldm.errors import UserError
from ldm.files import atomic_path
from ldm.geometry import LatentGeometry
from ldm.outputs import png_info

NAME = "class-{:05d}.png"
DEFAULT_SAMPLING = {"steps": 30, "batch_size": 4}


def missing_names(dataset: PriorPreservation) -> list[tuple[int, str]]:
    """``(seed, file name)`` of the images to generate: the lowest free ``class-N.png`` names."""
    wanted, names, number = dataset.missing_class_images, [], 0
    while len(names) < wanted:
        if not (dataset.class_data_root / NAME.format(number)).exists():
            names.append((number, NAME.format(number)))
        number += 1
    return names


def fill_class_folder(
    dataset: PriorPreservation,
    model: Any,
    geometry: LatentGeometry,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    names: list[tuple[int, str]] | None = None,
) -> int:
    """Generate the class images ``dataset`` lacks with ``model`` (a LatentDiffusion on its device), then read the
    folder; returns how many this rank made. Settings: ``dataset.class_sampling`` over 30 steps in batches of 4
    at the instance ``resolution`` (rounded down to the model's multiple); the model's train / eval mode is kept.
    ``names``: :func:`missing_names`, which several processes must take before any of them writes."""
    from ldm.inference import Pipeline  # the pipeline imports the models, which import the data modules
    from ldm.request import RuntimeOptions

    todo = (missing_names(dataset) if names is None else names)[rank::world_size]
    settings = {**DEFAULT_SAMPLING, **dataset.class_sampling}
    batch_size = int(settings.pop("batch_size"))
    side = max(geometry.multiple, dataset.resolution // geometry.multiple * geometry.multiple)
    settings.setdefault("width", side)
    settings.setdefault("height", side)
    if todo:
        dataset.class_data_root.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        try:
            pipe = Pipeline(model, geometry, RuntimeOptions(device=model.device))
            for begin in range(0, len(todo), batch_size):
                chunk = todo[begin : begin + batch_size]
                try:
                    result = pipe.generate(
                        dataset.class_prompt, n=len(chunk), seed=[seed for seed, _ in chunk], progress=False,
                        **settings,
                    )  # fmt: skip
                except TypeError as err:
                    raise UserError(f"class_sampling: {err}; use GenerationRequest's settings (steps, ...).") from err
                for i, (_, name) in enumerate(chunk):
                    with atomic_path(dataset.class_data_root / name) as partial, open(partial, "wb") as handle:
                        result.images[i].save(handle, format="PNG", pnginfo=png_info(result.parameters(i)))
        finally:
            model.train(was_training)
    if barrier is not None:
        barrier()
    dataset.load_class_images()
    return len(todo)


class GenerateClassImages(pl.Callback):
    """Fills the class folders of the datamodule's prior-preservation datasets when fitting starts, before the
    latents are cached (main.py adds it to every run, before :class:`~ldm.data.latent_cache.CacheLatents`);
    ``config`` is the run's config, for the model's geometry."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datasets = getattr(getattr(trainer, "datamodule", None), "datasets", {}).values()
        unread = [d for d in datasets if isinstance(d, PriorPreservation) and d.classes is None]
        if not unread:
            return
        # Every process lists the missing names before any writes, so that all split the same list.
        plans = [(dataset, missing_names(dataset)) for dataset in unread]
        trainer.strategy.barrier()
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        for dataset, names in plans:
            rank_zero_info(f"prior preservation: generating {len(names)} class image(s) into {dataset.class_data_root}")
            with torch.random.fork_rng(devices=cuda):  # the training run's random numbers stay as they were
                fill_class_folder(
                    dataset, pl_module, LatentGeometry.from_config(self.config), trainer.global_rank,
                    trainer.world_size, trainer.strategy.barrier, names,
                )  # fmt: skip
