"""LoRA training with ``main.py``: the base model frozen, only low-rank side branches trained, saved as kohya files.

    python main.py --base configs/lora/v1-lora.yaml -t model.params.ckpt_path=v1-5.safetensors \
        data.params.train.params.root=/path/to/captioned-images

``LoraLatentDiffusion`` (SD 1.x / 2.x, a ``LatentDiffusion``) and ``LoraSDXL`` (an ``SDXLDiffusion``,
``configs/lora/sdxl-lora.yaml``) are :class:`LoraTrainingMixin` on those classes: after loading ``ckpt_path`` it
freezes every weight and hangs a branch ``scale * up(down(x))`` (``scale = alpha / rank``) on each target layer
through a forward hook, so the model's modules, state-dict keys and forward code stay as they are. ``up`` starts at
zero, so training starts from the base model exactly. Targets are kohya's defaults: every Linear and 1x1 convolution
inside the UNet's transformer blocks (attention, feed-forward, proj_in / proj_out) and, with ``text_encoder: true``,
the CLIP text encoder's attention and MLP layers (SDXL: CLIP ViT-L's, ``lora_te1_``; OpenCLIP towers are left out).

The branches are written in kohya's layout (``lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``), which :func:`ldm.adapters.lora.read_lora`, A1111 and ComfyUI load: to
``<run>/lora/<name>-step<N>.safetensors`` at each checkpoint and ``<run>/lora/<name>.safetensors`` at the end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.adapters.lora_keys import TEXT, Target, model_targets
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.sdxl import SDXLDiffusion
from ldm.util import ConfigError

# kohya's names for the layers it trains: the diffusers form of the UNet's transformer layers.
_UNET_TRAINED = re.compile(r"^lora_unet_(?:down_blocks_\d+_|up_blocks_\d+_|mid_block_)attentions_\d+_")


class LoraBranch(nn.Module):
    """``scale * up(down(x))`` beside one layer: down (rank, in[, kh, kw]) with the layer's stride and padding, up
    (out, rank[, 1, 1]) zero at the start. ``alpha`` is a buffer so the file records it."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
            )
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        elif isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            raise ConfigError(f"LoRA training takes Linear and Conv2d layers, not {type(layer).__name__}.")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.lora_down.weight
        return self.lora_up(self.lora_down(x.to(down.dtype))) * self.scale


def trained_targets(model: nn.Module, text_encoder: bool) -> dict[str, Target]:
    """kohya name -> Target of the layers a LoRA trains, each layer once (``lora_te_`` rather than ``lora_te1_`` for a
    model with one text encoder). OpenCLIP text towers are left out: their q / k / v share one ``in_proj_weight``."""
    chosen: dict[str, Target] = {}
    seen = set()
    for name, target in model_targets(model).items():
        if target.role == TEXT:
            wanted = text_encoder and ".resblocks." not in target.name
        else:
            wanted = bool(_UNET_TRAINED.match(name)) and getattr(target.module, "kernel_size", (1, 1)) == (1, 1)
        if wanted and id(target.module) not in seen:
            seen.add(id(target.module))
            chosen[name] = target
    return chosen


class LoraTrainingMixin:
    """Trainable LoRA branches on a frozen diffusion model (module docstring); see :class:`LoraLatentDiffusion` for
    the arguments."""

    # What makes captions reach the text encoder with gradients, for lora_config.text_encoder's error.
    trainable_text_hint = "model.params.cond_stage_trainable: true"

    def __init__(self, *args: Any, lora_config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = dict(lora_config or {})
        unknown = set(spec) - {"rank", "alpha", "text_encoder", "name", "save_dtype"}
        if unknown:
            raise ConfigError(f"lora_config: unknown keys {sorted(unknown)}; known: rank, alpha, text_encoder, name, "
                              "save_dtype.")  # fmt: skip
        rank = int(spec.get("rank", 4))
        alpha = float(spec.get("alpha", rank))
        self.lora_text_encoder = bool(spec.get("text_encoder", False))
        self.lora_name = str(spec.get("name", "lora"))
        dtypes = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
        if spec.get("save_dtype", "float16") not in dtypes or rank < 1:
            raise ConfigError("lora_config: rank must be >= 1 and save_dtype one of float16, float32, bfloat16.")
        self.lora_save_dtype = dtypes[spec.get("save_dtype", "float16")]
        if self.use_ema:
            raise ConfigError("LoRA training keeps no EMA: set model.params.use_ema: false.")
        if self.lora_text_encoder and not self.cond_stage_trainable:
            raise ConfigError(f"lora_config.text_encoder needs {self.trainable_text_hint}.")
        self.requires_grad_(False)
        targets = trained_targets(self, self.lora_text_encoder)
        if not targets:
            raise ConfigError("LoRA training found no layer to train in this model.")
        self.lora_layers = nn.ModuleDict({name: LoraBranch(t.module, rank, alpha) for name, t in targets.items()})
        for name, target in targets.items():
            target.module.register_forward_hook(_hook(self.lora_layers[name]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Only the LoRA branches' weights."""
        return list(self.lora_layers.parameters())

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The branches in kohya's layout: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``."""
        out = {}
        for name, branch in self.lora_layers.items():
            out[f"{name}.lora_down.weight"] = branch.lora_down.weight.detach().to("cpu", self.lora_save_dtype)
            out[f"{name}.lora_up.weight"] = branch.lora_up.weight.detach().to("cpu", self.lora_save_dtype)
            out[f"{name}.alpha"] = branch.alpha.detach().to("cpu", self.lora_save_dtype)
        return {k: v.contiguous() for k, v in out.items()}

    def save_lora(self, path: str | Path) -> Path:
        """Write the kohya ``.safetensors`` with kohya's metadata keys (network module, dim, alpha)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        branch = next(iter(self.lora_layers.values()))
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(branch.lora_down.weight.shape[0]),
            "ss_network_alpha": str(float(branch.alpha)),
            "ss_output_name": self.lora_name,
            "ss_steps": str(int(getattr(self, "global_step", 0))),
        }
        save_file(self.lora_state_dict(), str(path), metadata=metadata)
        return path

    def _lora_dir(self) -> Path:
        callback = getattr(self.trainer, "checkpoint_callback", None)
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath).parent / "lora"
        return Path(self.trainer.default_root_dir) / "lora"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super_hook = getattr(super(), "on_save_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
        if self.trainer.is_global_zero:
            self.save_lora(self._lora_dir() / f"{self.lora_name}-step{self.global_step:06d}.safetensors")

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.save_lora(self._lora_dir() / f"{self.lora_name}.safetensors")


class LoraLatentDiffusion(LoraTrainingMixin, LatentDiffusion):
    """LatentDiffusion with trainable LoRA branches and a frozen base.

    Args (``lora_config``): ``rank`` (default 4), ``alpha`` (default = rank: scale 1), ``text_encoder`` (also train
    the CLIP text encoder's layers; needs ``cond_stage_trainable: true`` so captions are encoded with gradients),
    ``name`` (the file name, default "lora"), ``save_dtype`` (``float16`` as kohya's default, or ``float32``).
    Everything else is LatentDiffusion's; ``use_ema`` must be off (the branches are tiny and the base does not move).
    """


class LoraSDXL(LoraTrainingMixin, SDXLDiffusion):
    """SDXLDiffusion with trainable LoRA branches and a frozen base: ``lora_unet_*`` and, with ``text_encoder``,
    ``lora_te1_*`` (CLIP ViT-L); arguments as :class:`LoraLatentDiffusion`'s, except that the text encoder's captions
    come with gradients when its conditioner entry is marked ``is_trainable: true`` (its own weights stay frozen)."""

    trainable_text_hint = "the CLIP embedder's cond_stage_config emb_models entry marked is_trainable: true"


def _hook(branch: LoraBranch) -> Any:
    def add_branch(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + branch(inputs[0]).to(output.dtype)

    return add_branch
