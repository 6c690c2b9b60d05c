"""LoRA / LyCORIS files merged into a loaded model's weights, and taken out again exactly.

    merger = LoraMerger(model)
    merger.apply([(read_lora("style.safetensors"), 1.0, 0.8)])  # (file, text-encoder weight, UNet weight)
    merger.apply([])                                             # the base model again, bit for bit

Why merge (as A1111 does) rather than a side branch: a merged LoRA costs nothing per sampler step, works with every
attention kernel, ``torch.compile`` and fp16 / bf16 weights unchanged, and touches no module's forward. The cost is
the switch: the first time a weight is changed its original is copied to the CPU, and every switch writes the base
back from that copy and merges the new set afresh, so no rounding builds up over any number of switches and removing
all LoRAs gives the original tensors exactly. A weight of 0 skips the module, so it too is the base exactly.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.adapters.lora_formats import SUFFIXES, module_delta
from ldm.adapters.lora_keys import TEXT, Target, is_diffusers_key, kohya_key, model_targets
from ldm.checkpoint import read_checkpoint
from ldm.errors import UserError

_LISTED = 5  # names shown in an error about unknown keys


@dataclass(eq=False)
class LoraFile:
    """A LoRA file's tensors grouped by layer: ``modules[kohya name][suffix]``; ``short_hash`` is A1111's."""

    name: str
    modules: dict[str, dict[str, torch.Tensor]]
    short_hash: str | None = None


def group_modules(state: Mapping[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA state dict (kohya or diffusers / PEFT keys) -> ``{kohya module name: {suffix: tensor}}``.

    Raises UserError naming the keys of no known form (never a partial load).
    """
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in state.items():
        try:
            kohya = kohya_key(key) if is_diffusers_key(key) else key
        except UserError:
            unknown.append(key)
            continue
        module, dot, suffix = kohya.partition(".")
        if not dot or suffix not in SUFFIXES or not module.startswith("lora_"):
            unknown.append(key)
            continue
        modules[module][suffix] = value
    if unknown:
        shown = ", ".join(unknown[:_LISTED]) + (f" and {len(unknown) - _LISTED} more" if len(unknown) > _LISTED else "")
        raise UserError(
            f"LoRA {name!r}: {len(unknown)} key(s) of no known LoRA / LyCORIS form ({shown}); expected kohya keys "
            "(lora_unet_* / lora_te*_ with .lora_down.weight, .hada_w1_a, .lokr_w1, .alpha ...) or diffusers / PEFT "
            "keys (unet.* / text_encoder.* with .lora_A.weight ...)."
        )
    if not modules:
        raise UserError(f"LoRA {name!r} holds no tensors.")
    return dict(modules)


def short_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA hash: the first 12 hex digits of the sha256 of a ``.safetensors`` file's tensor data (the bytes
    after its header, kohya's "addnet" hash, so editing the metadata keeps it) or of any other file's bytes."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if path.suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_lora(path: str | os.PathLike, name: str | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` / ``.pt`` / ``.ckpt`` with the project's safe reader (nothing in it runs)."""
    path = Path(path)
    state, _ = read_checkpoint(path)
    name = name or path.stem
    return LoraFile(name, group_modules(state, name), short_hash(path))


@dataclass(frozen=True)
class _Bound:
    target: Target
    module_name: str
    tensors: Mapping[str, torch.Tensor]
    multiplier: float


class LoraMerger:
    """Merges a set of LoRAs into ``model`` (a LatentDiffusion) and restores its weights exactly.

    ``apply(entries)`` makes the model the base plus exactly ``entries``, each ``(LoraFile, te_weight, unet_weight)``;
    applying the set already merged does nothing. ``touched`` holds the CPU copies of the original weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._targets: dict[str, Target] | None = None
        self.touched: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
        self._merged: tuple[tuple[LoraFile, float, float], ...] = ()

    @property
    def targets(self) -> dict[str, Target]:
        if self._targets is None:
            self._targets = model_targets(self.model)
        return self._targets

    def _original(self, target: Target) -> torch.Tensor:
        """The base value of a target's weight (rows), float32, on its parameter's device."""
        param = getattr(target.module, target.param)
        saved = self.touched.get(target.name)
        base = saved[2].to(param.device) if saved is not None else param.detach()
        return (base[target.rows[0] : target.rows[1]] if target.rows else base).float()

    def _bind(self, entries: Sequence[tuple[LoraFile, float, float]]) -> list[_Bound]:
        bound = []
        for lora, te, unet in entries:
            missing = [name for name in lora.modules if name not in self.targets]
            if missing:
                shown = ", ".join(missing[:_LISTED]) + (
                    f" and {len(missing) - _LISTED} more" * (len(missing) > _LISTED)
                )
                raise UserError(
                    f"LoRA {lora.name!r}: {len(missing)} of its {len(lora.modules)} modules match no layer of this "
                    f"model ({shown}); is it a LoRA for another model family (SD 1.x / 2.x / SDXL)?"
                )
            for name, tensors in lora.modules.items():
                target = self.targets[name]
                multiplier = te if target.role == TEXT else unet
                if multiplier != 0:
                    bound.append(_Bound(target, name, tensors, float(multiplier)))
        for b in bound:  # every shape checked on the meta device before any weight changes
            meta = {k: v.to("meta") for k, v in b.tensors.items()}
            module_delta(b.module_name, meta, self._original(b.target).to("meta"))
        return bound

    @torch.no_grad()
    def apply(self, entries: Sequence[tuple[LoraFile, float, float]]) -> bool:
        """Make the model its base weights plus ``entries``; True when any weight changed. UserError (nothing
        changed) for a module that matches no layer or does not fit it."""
        key = tuple((lora, float(te), float(unet)) for lora, te, unet in entries)  # LoraFile compares by identity
        if key == self._merged:
            return False
        bound = self._bind(entries)
        self._put_back()
        by_param: dict[str, list[_Bound]] = defaultdict(list)
        for b in bound:
            by_param[b.target.name].append(b)
        for name, group in by_param.items():
            self._merge(name, group)
        # Weights the new set leaves alone are the base again: their copies are no longer needed.
        for name in [n for n in self.touched if n.removesuffix(":bias") not in by_param]:
            del self.touched[name]
        self._merged = key
        return True

    def _merge(self, name: str, group: list[_Bound]) -> None:
        """Write base + the sum of ``group``'s changes into one parameter (all its row slices at once)."""
        module, attr = group[0].target.module, group[0].target.param
        param = getattr(module, attr)
        if name not in self.touched:  # kept from an earlier merge otherwise: one copy per weight, not per switch
            self.touched[name] = (module, attr, param.detach().to("cpu", copy=True))
        base = param.detach().float()  # the original: _put_back() ran before
        weight = base.clone()
        bias_attr = group[0].target.bias
        bias = getattr(module, bias_attr).detach().float().clone() if bias_attr else None  # .float() may alias
        for b in group:
            rows = slice(*b.target.rows) if b.target.rows else slice(None)
            tensors = {k: v.to(param.device) for k, v in b.tensors.items()}
            updown, bias_change = module_delta(b.module_name, tensors, base[rows])
            weight[rows].add_(updown, alpha=b.multiplier)
            if bias_change is not None and bias is not None:
                bias[rows].add_(bias_change.reshape(bias[rows].shape), alpha=b.multiplier)
        param.copy_(weight.to(param.dtype))
        if bias is not None and any("diff_b" in b.tensors for b in group):
            target = getattr(module, bias_attr)
            if f"{name}:bias" not in self.touched:
                self.touched[f"{name}:bias"] = (module, bias_attr, target.detach().to("cpu", copy=True))
            target.copy_(bias.to(target.dtype))

    def _put_back(self) -> None:
        for module, attr, original in self.touched.values():
            getattr(module, attr).copy_(original)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the original of every weight a LoRA changed (bit for bit) and forget the merged set."""
        self._put_back()
        self.touched.clear()
        self._merged = ()
