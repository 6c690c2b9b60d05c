"""Lightning plumbing of diffusion training: steps, logging, EMA updates, optimizers, caption dropout.

The objective itself (``p_losses``, ``shared_step``) lives with the diffusion process in ``ddpm.py``; this mixin
wires it into Lightning 2.x. Logged names are the CompVis ones: ``train/loss``, ``train/loss_simple``, ...,
``val/loss_simple`` and ``val/loss_simple_ema``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from ldm.data.latent_cache import LATENT_KEY, MOMENTS_KEY
from ldm.util import ConfigError, instantiate_from_config


def check_ucg_training(ucg_training: Mapping[str, Any]) -> None:
    """Validate ``ucg_training``: ``{batch_key: {p: drop probability, val: replacement}}``."""
    for key, spec in ucg_training.items():
        if not isinstance(spec, Mapping) or "p" not in spec:
            raise ConfigError(f"ucg_training.{key}: expected {{p: <probability>, val: <replacement>}}, got {spec!r}.")
        if not 0.0 <= float(spec["p"]) <= 1.0:
            raise ConfigError(f"ucg_training.{key}.p must be in [0, 1], got {spec['p']}.")


def prior_preservation_loss(
    losses: torch.Tensor,
    class_mask: torch.Tensor | None,
    prior_loss_weight: float,
    log: dict[str, torch.Tensor],
    prefix: str,
) -> torch.Tensor:
    """The batch loss from per-sample losses (B,): their mean, or with ``class_mask`` (B,) (True for the class
    images of DreamBooth's prior preservation) ``mean(instance) + prior_loss_weight * mean(class)``, a part left out
    when the batch has none of its samples. Logs ``{prefix}/loss_instance`` and ``{prefix}/loss_prior``."""
    if class_mask is None:
        return losses.mean()
    class_mask = class_mask.to(losses.device, torch.bool)
    loss = losses.new_zeros(())
    if (~class_mask).any():
        instance = losses[~class_mask].mean()
        log[f"{prefix}/loss_instance"] = instance.detach()
        loss = loss + instance
    if class_mask.any():
        prior = losses[class_mask].mean()
        log[f"{prefix}/loss_prior"] = prior.detach()
        loss = loss + prior_loss_weight * prior
    return loss


class DiffusionTrainingMixin:
    """Lightning hooks for ``DDPM`` and its subclasses.

    The model provides ``shared_step(batch) -> (loss, loss_dict)``, ``trainable_parameters()``, ``model`` /
    ``model_ema`` / ``use_ema`` / ``ema_scope``, ``ucg_training``, ``scheduler_config``, ``first_stage_key`` and
    ``learning_rate`` (set by ``main.py`` from ``base_learning_rate``).
    """

    def drop_conditioning(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Classifier-free-guidance dropout: each entry of ``batch[key]`` becomes ``val`` with probability ``p``,
        for every ``key: {p, val}`` of ``ucg_training`` (``val: null`` means the empty prompt).

        Returns a new batch dict; lists (captions) and tensors (e.g. class labels) are both handled. Uses torch's
        global generator, so runs seeded with ``--seed`` drop the same entries.
        """
        if not self.ucg_training:
            return dict(batch)
        batch = dict(batch)
        for key, spec in self.ucg_training.items():
            values = batch[key]
            drop = torch.rand(len(values)) < float(spec["p"])
            val = spec.get("val")
            if isinstance(values, torch.Tensor):
                if val is None:
                    raise ConfigError(f"ucg_training.{key}.val is needed: batch['{key}'] is a tensor.")
                mask = drop.to(values.device).view(-1, *([1] * (values.dim() - 1)))
                batch[key] = torch.where(mask, torch.as_tensor(val, dtype=values.dtype, device=values.device), values)
            else:
                val = "" if val is None else val
                batch[key] = [val if d else v for v, d in zip(values, drop.tolist(), strict=True)]
        return batch

    def _batch_size(self, batch: Mapping[str, Any]) -> int:
        # Batches of cached latents (ldm.data.latent_cache) carry them instead of the images.
        for key in (self.first_stage_key, MOMENTS_KEY, LATENT_KEY):
            if key in batch:
                return len(batch[key])
        raise KeyError(f"the batch has no '{self.first_stage_key}' (keys: {sorted(batch)}).")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        batch = self.drop_conditioning(batch)
        loss, loss_dict = self.shared_step(batch)
        size = self._batch_size(batch)
        self.log_dict(loss_dict, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("global_step", float(self.global_step), prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        if self.scheduler_config is not None:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Log the losses with the trained weights and, as ``*_ema``, with the EMA weights.

        Without EMA the ``*_ema`` names repeat the plain values, so a ``monitor: val/loss_simple_ema`` (as in SD
        configs) works either way.
        """
        _, loss_dict = self.shared_step(batch)
        ema_dict = loss_dict
        if self.use_ema:
            with self.ema_scope():
                _, ema_dict = self.shared_step(batch)
        size = self._batch_size(batch)
        self.log_dict(loss_dict, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        ema_dict = {f"{k}_ema": v for k, v in ema_dict.items()}
        self.log_dict(ema_dict, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after each weight update (not per batch: accumulation), before any callback saves a checkpoint.
        if self.use_ema:
            self.model_ema(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restarted_from_ckpt = True

    def configure_optimizers(self) -> Any:
        """AdamW over ``trainable_parameters()`` at ``learning_rate``; with ``scheduler_config``, a ``LambdaLR``
        stepped every optimizer step that multiplies it by the schedule's value."""
        if self.learning_rate is None:
            raise RuntimeError("set model.learning_rate before training (main.py sets it from base_learning_rate).")
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if self.scheduler_config is None:
            return optimizer
        schedule = instantiate_from_config(self.scheduler_config, path="model.params.scheduler_config")
        scheduler = LambdaLR(optimizer, lr_lambda=getattr(schedule, "schedule", schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
