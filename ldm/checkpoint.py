"""The one checkpoint loader and saver: ``.ckpt`` (pickled, read safely) and ``.safetensors``, SD key layouts, EMA.

Every entry point goes through :func:`load_model_from_config` or :func:`load_state_dict_into`, so the checks are the
same everywhere: a checkpoint never runs code when read, and a checkpoint that does not fit the model is an error
that says which config fits, never a silently half-random model.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.files import atomic_path
from ldm.lazy_checkpoint import LazyStateDict, open_checkpoint, split_state_dict
from ldm.modules.ema import ema_buffer_name
from ldm.serialization import CheckpointError, read_file

CLIP_PREFIX = "cond_stage_model.transformer."
CLIP_NESTED = CLIP_PREFIX + "text_model."
# The children of the CLIP text model: only keys under these are CLIP's (``cond_stage_model.transformer.*`` is also
# the BERTEmbedder's x-transformers encoder, ``token_emb``, ``attn_layers`` ..., which keeps its names).
CLIP_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
SDXL_CLIP_UNNESTED = re.compile(
    r"^(conditioner\.embedders\.\d+\.transformer\.)((?:embeddings|encoder|final_layer_norm)\.)"
)
BERT_KEY = CLIP_PREFIX + "token_emb.weight"
OPENCLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
DEPTH_PREFIX = "depth_model."  # SD 2 depth-to-image: the MiDaS weights
# Models a whole checkpoint may hold beside the SD model (lllyasviel's ControlLDM files control_sd15_*.pth, and merges
# of them), by key prefix: a base load takes the SD part and names these; any other extra key fails the strict load.
ADDON_PREFIXES = {"control_model.": "a ControlNet ({prefix}*, {count} tensors); use it with --control_model {path}"}

# load_state_dict_into hands tensors to load_state_dict in groups of about this size: one call per tensor would walk
# the module tree some 2,500 times for SDXL, one call for all would hold the whole file.
LOAD_CHUNK_BYTES = 64 << 20

# Keys real checkpoints carry that the model may not have, and that are safe to drop: the CLIP position ids are a
# constant arange that recent transformers releases no longer save.
DROPPABLE_SUFFIXES = ("embeddings.position_ids",)
# Empty marker tensors some checkpoints carry (ComfyUI's convention): v-prediction, zero-terminal-SNR schedule. They
# are read by ldm.model_detection, and hold no weights.
MARKER_KEYS = frozenset({"v_pred", "ztsnr"})

# The diffusion schedule is computed from the config (in float64, stored as float32), so a checkpoint's copy is
# only checked for its shape: it may be rounded (an fp16 export moved sigma_min from 0.02917 to 0.03127), and
# pruned files lack it.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        # sgm's (SDXL's) denoiser table of the same schedule's sigmas.
        "denoiser.sigmas",
    }
)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(
    path: str | os.PathLike, layout_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.ckpt``/``.pt``/``.pth``/``.bin`` or ``.safetensors`` file (told apart by content, see
    :mod:`ldm.serialization`), running nothing it contains.

    Returns ``(state_dict, info)``: the tensors (from a Lightning checkpoint's ``state_dict`` or a bare state dict) and
    plain metadata such as ``global_step`` when the file has it. ``layout_only``: the tensors are on the meta device
    (names, shapes, dtypes), read without the file's data.
    """
    path = Path(path)
    return split_state_dict(path, read_file(path, layout_only=layout_only)[1])


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The whole dict of a Lightning checkpoint (weights, optimizer and loop states ...), read as safely as
    :func:`read_checkpoint`; for resuming a run."""
    path = Path(path)
    kind, data = read_file(path)
    if kind == "safetensors" or not isinstance(data, Mapping) or not isinstance(data.get("state_dict"), Mapping):
        raise CheckpointError(
            f"'{path}' is not a training checkpoint (a Lightning .ckpt with state_dict, optimizer and loop states); "
            "to start a new run from its weights, set model.params.ckpt_path instead of resuming."
        )
    return dict(data)


def nonfinite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf.

    min and max carry any NaN and any infinity, and are far cheaper than ``isfinite`` over every element: 0.11 s
    instead of 2.9 s for 200 M float32 weights on a 2-core CPU (SD 1.x has 1.07 billion).
    """
    bad = []
    for key, value in state_dict.items():
        if value.is_floating_point() and not value.is_meta and value.numel():
            if not torch.isfinite(torch.stack(torch.aminmax(value))).all():
                bad.append(key)
    return bad


# ---------------------------------------------------------------------------------------------------------------------
# Key layout


def to_original_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring a state dict into the CompVis SD layout.

    SD 1.x checkpoints name the text encoder ``cond_stage_model.transformer.text_model.*``; state dicts written with a
    transformers release whose ``CLIPTextModel`` does not nest ``text_model`` lack that level. Both load. Other keys
    under ``cond_stage_model.transformer.`` (the LDM BERTEmbedder's) are left as they are.
    """
    return {original_key(key): value for key, value in state_dict.items()}


def original_key(key: str) -> str:
    """A state-dict key in the CompVis SD layout (see :func:`to_original_layout`)."""
    if key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX) :].startswith(CLIP_TEXT_PARTS):
        return CLIP_NESTED + key[len(CLIP_PREFIX) :]
    # SDXL's CLIP ViT-L: conditioner.embedders.<i>.transformer.*, nested the same way.
    return SDXL_CLIP_UNNESTED.sub(r"\1text_model.\2", key)


def ema_to_model_keys(state_dict: Mapping[str, Any], model_keys: Iterable[str]) -> dict[str, Any]:
    """Replace ``model.*`` weights by their ``model_ema.*`` copies (inference with the EMA weights); the values may
    be tensors or anything standing for them (the loader maps keys to the file's key names).

    Raises CheckpointError when the checkpoint has no EMA weights.
    """
    out = dict(state_dict)
    replaced = 0
    for key in model_keys:
        if key.startswith("model."):
            ema_key = EMA_PREFIX + ema_buffer_name(key[len("model.") :])
            if ema_key in state_dict:
                out[key] = state_dict[ema_key]
                replaced += 1
    if replaced == 0:
        raise CheckpointError("the checkpoint has no EMA weights (model_ema.*); load it without use_ema_weights.")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Fitting a state dict to a model


def _component(key: str) -> str:
    for prefix in (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", DEPTH_PREFIX, EMA_PREFIX):
        if key.startswith(prefix):
            return prefix.rstrip(".")
    return "other"


def _summarise(keys: list[str], what: str) -> str:
    if not keys:
        return ""
    by_part = Counter(_component(k) for k in keys)
    parts = ", ".join(f"{n} in {part}" for part, n in by_part.most_common())
    examples = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
    return f"{len(keys)} {what} ({parts}; e.g. {examples})"


def _diagnose(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Name the config that fits a checkpoint the model's config does not."""
    hints = []
    if any(k.startswith(OPENCLIP_PREFIX) for k in state_dict) and any(k.startswith(CLIP_PREFIX) for k in expected):
        hints.append(
            "This is an SD 2.x checkpoint (OpenCLIP text encoder): use configs/stable-diffusion/v2-inference.yaml "
            "(512px, eps) or configs/stable-diffusion/v2-inference-v.yaml (768px, v-prediction)."
        )
    elif any(k.startswith(CLIP_NESTED) for k in state_dict) and not any(k.startswith(CLIP_NESTED) for k in expected):
        hints.append(
            "This is an SD 1.x checkpoint (CLIP ViT-L/14 text encoder): use configs/stable-diffusion/v1-inference.yaml."
        )
    elif BERT_KEY in state_dict and BERT_KEY not in expected:
        hints.append(
            "This is an LDM text-to-image checkpoint (BERTEmbedder text encoder): use "
            "configs/latent-diffusion/txt2img-1p4B-eval.yaml."
        )
    if any(k.startswith(DEPTH_PREFIX) for k in expected) and not any(k.startswith(DEPTH_PREFIX) for k in state_dict):
        hints.append(
            "This config is SD 2 depth-to-image, whose checkpoint also holds the MiDaS depth model (depth_model.*); "
            "this one has none: give 512-depth-ema.ckpt (Stability's stable-diffusion-2-depth) or a checkpoint saved "
            "from this config."
        )
    ctx_key = next((k for k in expected if k.endswith("attn2.to_k.weight")), None)
    if ctx_key and ctx_key in state_dict and state_dict[ctx_key].shape != expected[ctx_key].shape:
        hints.append(
            f"The UNet's cross-attention context is {state_dict[ctx_key].shape[1]} wide in the checkpoint but "
            f"{expected[ctx_key].shape[1]} in the config (768 = SD 1.x, 1024 = SD 2.x)."
        )
    in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    if in_key in state_dict and in_key in expected and state_dict[in_key].shape[1] != expected[in_key].shape[1]:
        n = state_dict[in_key].shape[1]
        if n == 5:
            kind = "a depth-to-image model: use configs/stable-diffusion/v2-midas-inference.yaml (scripts/depth2img.py)"
        elif n == 9:
            kind = (
                "an inpainting model: use configs/stable-diffusion/v1-inpainting-inference.yaml (SD 1.x) or "
                "v2-inpainting-inference.yaml (SD 2.x)"
            )
        elif expected[in_key].shape[1] == 9:
            kind = (
                "an ordinary model, but the config is for inpainting: use v1-inference.yaml / v2-inference.yaml, or "
                "list the input convolution in finetune_keys to start an inpainting model from it"
            )
        else:
            kind = "a model of another kind"
        hints.append(
            f"The checkpoint's UNet takes {n} input channels, the config's {expected[in_key].shape[1]}: {kind}."
        )
    return " ".join(hints)


def fit_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore_prefixes: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """Check a (layout-normalised) state dict against ``model`` and return what ``load_state_dict`` should get.

    Missing, unexpected or wrongly shaped keys raise CheckpointError with a short per-component summary and, where it
    can tell, the config that fits. Tolerated: the extras real SD checkpoints carry (``position_ids``, ``model_ema.*``
    for a model without EMA), schedule buffers absent from pruned files, and keys under ``ignore_prefixes``. The
    model keeps its own schedule buffers (see :data:`SCHEDULE_BUFFERS`).
    """
    ignore_prefixes = tuple(ignore_prefixes)
    expected = model.state_dict()
    has_ema = any(k.startswith(EMA_PREFIX) for k in expected)
    fitted: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape = [], []
    for key, value in state_dict.items():
        if ignore_prefixes and key.startswith(ignore_prefixes):
            continue
        if key not in expected:
            if key.endswith(DROPPABLE_SUFFIXES) or key in MARKER_KEYS or (key.startswith(EMA_PREFIX) and not has_ema):
                continue
            unexpected.append(key)
        elif value.shape != expected[key].shape:
            wrong_shape.append(f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} here")
        elif key not in SCHEDULE_BUFFERS:
            fitted[key] = value
    missing = [
        k
        for k in expected
        if k not in state_dict and k not in SCHEDULE_BUFFERS and not (ignore_prefixes and k.startswith(ignore_prefixes))
    ]
    if missing or unexpected or wrong_shape:
        lines = [s for s in (_summarise(missing, "missing"), _summarise(unexpected, "unexpected")) if s]
        if wrong_shape:
            lines.append(f"{len(wrong_shape)} with the wrong shape (e.g. {wrong_shape[0]})")
        hint = _diagnose(state_dict, expected)
        raise CheckpointError(
            "the checkpoint does not fit the model built from this config: "
            + "; ".join(lines)
            + "."
            + (f" {hint}" if hint else "")
        )
    return fitted


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    use_ema_weights: bool = False,
    ignore_prefixes: Iterable[str] = (),
) -> None:
    """Load a state dict in any supported layout into ``model`` strictly (see :func:`fit_state_dict`).

    ``use_ema_weights`` copies the checkpoint's ``model_ema.*`` weights into the diffusion model, as inference with
    the EMA weights does. The keys are fitted first, from the shapes alone (a :class:`LazyStateDict`'s layout); the
    tensors are then taken from ``state_dict`` a few at a time (:data:`LOAD_CHUNK_BYTES`) and released once in the
    model, so loading a lazily read file costs the model's memory and one chunk, not the file's as well.
    """
    layout = state_dict.layout if isinstance(state_dict, LazyStateDict) else state_dict
    names = {original_key(key): key for key in layout}  # {key in the original layout: key in state_dict}
    if use_ema_weights:
        names = ema_to_model_keys(names, model.state_dict().keys())
    fitted = fit_state_dict(model, {key: layout[name] for key, name in names.items()}, ignore_prefixes)
    targets = model.state_dict()
    bad: list[str] = []
    chunk: dict[str, torch.Tensor] = {}
    for number, key in enumerate(fitted, 1):
        name, target = names[key], targets[key]

        def check(tensor: torch.Tensor, key: str = key) -> None:
            if nonfinite_tensors({key: tensor}):
                bad.append(key)

        # A model built by empty_parameters() takes the tensors themselves (assign), in the dtype it was built with.
        if target.is_meta and isinstance(state_dict, LazyStateDict):
            value = state_dict.converted(name, target.dtype, check)
        else:
            value = state_dict[name]
            check(value)
            value = value.to(target.dtype) if target.is_meta else value
        chunk[key] = value
        if number == len(fitted) or sum(t.nbytes for t in chunk.values()) >= LOAD_CHUNK_BYTES:
            _load_chunk(model, chunk, targets)
            chunk = {}
        del value  # before the next one is read
    if bad:
        warnings.warn(
            f"{len(bad)} tensor(s) of the checkpoint hold NaN or inf (e.g. {', '.join(bad[:3])}): the model will "
            "likely give NaN or black images. The file is damaged, or was saved from a diverged run.",
            stacklevel=2,
        )


def _load_chunk(model: nn.Module, chunk: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
    """Meta tensors (empty_parameters()) take their values by assignment; real ones (computed buffers, or a model
    with weights) are copied into."""
    for assign in (False, True):
        part = {k: v for k, v in chunk.items() if targets[k].is_meta == assign}
        if part:  # each call walks every module of the model
            model.load_state_dict(part, strict=False, assign=assign)


def addon_counts(state_dict: Iterable[str], model_keys: Iterable[str]) -> dict[str, int]:
    """``{prefix: number of keys}`` of the :data:`ADDON_PREFIXES` models in the file that the model has no part of."""
    model_prefixes = {p for key in model_keys for p in ADDON_PREFIXES if key.startswith(p)}
    counts = Counter(p for key in state_dict for p in ADDON_PREFIXES if key.startswith(p))
    return {p: n for p, n in counts.items() if p not in model_prefixes}


def read_ckpt_path(path: str | os.PathLike) -> LazyStateDict:
    """The state dict of a config's ``ckpt_path``, read while the model is built, a tensor at a time as it is loaded
    (:class:`LazyStateDict`), so fine-tuning SDXL from a file does not hold the file beside the model.

    A file that does not exist is a one-line ConfigError naming the config key and the file: several original configs
    name checkpoints no repository ships (``models/first_stage_models/kl-f8/model.ckpt``), and the fix is either
    to give the file or to drop the key.
    """
    if not Path(path).exists():
        from ldm.util import ConfigError, building_path

        raise ConfigError(
            f"{building_path()}.params.ckpt_path: checkpoint '{path}' does not exist; give the path of that file, or "
            "remove ckpt_path to build the model with freshly initialised weights."
        )
    return open_checkpoint(path)[0]


def init_from_ckpt(model: nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = ()) -> None:
    """Load ``path`` into ``model`` while it is built (a config's ``ckpt_path``), skipping ``ignore_keys`` prefixes."""
    state_dict = read_ckpt_path(path)
    load_state_dict_into(model, state_dict, ignore_prefixes=ignore_keys)


def load_model_from_config(
    config: Any,
    ckpt: str | os.PathLike | None,
    device: torch.device | str | None = None,
    use_ema_weights: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build ``config.model`` (or the model node itself) and load ``ckpt`` strictly; returns the model in eval mode.

    ``ckpt=None`` keeps the freshly initialised weights (for tests and training from scratch), in float32. The file
    is read one tensor at a time (:func:`ldm.lazy_checkpoint.open_checkpoint`), so the peak memory is the model's
    and not the model's plus the file's. ``dtype`` (e.g. ``torch.float16``): the floating-point parameters are made
    in that precision straight from the file, never in float32 first; buffers (noise schedules) keep theirs.
    """
    from ldm.util import default_device, instantiate_from_config

    node = config.model if "model" in config else config
    path = "model" if "model" in config else None
    if ckpt is None:
        model = instantiate_from_config(node, path=path)
    else:
        # The checkpoint overwrites every parameter: skip their random initialisation and its memory.
        with empty_parameters():
            model = instantiate_from_config(node, path=path)
        if dtype is not None:
            for param in model.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(dtype)  # on the meta device: costs nothing
        try:
            state_dict = open_checkpoint(ckpt)[0]
            addons = addon_counts(state_dict, model.state_dict().keys())
            load_state_dict_into(model, state_dict, use_ema_weights=use_ema_weights, ignore_prefixes=addons)
        except CheckpointError as err:
            raise CheckpointError(f"{Path(ckpt).name}: {err}") from None
        for prefix, count in addons.items():
            usage = ADDON_PREFIXES[prefix].format(prefix=prefix, count=count, path=ckpt)
            print(f"{Path(ckpt).name} also holds {usage} (not loaded into the base model)")
        left = [name for name, t in model.state_dict().items() if t.is_meta]
        if left:
            raise CheckpointError(f"{Path(ckpt).name} does not set {len(left)} tensor(s) of the model, e.g. {left[0]}.")
    return model.to(device if device is not None else default_device()).eval()


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Within the block, module parameters are created on the meta device: no memory and no initialisation, which
    for SD would cost seconds and a second copy of the weights. Buffers (noise schedules, position ids) are computed
    as usual, since checkpoints need not hold them. Load the weights with :func:`load_state_dict_into`."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


# ---------------------------------------------------------------------------------------------------------------------
# Writing files


def _unshare(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory, so tied weights are stored as copies."""
    seen: set[int] = set()
    out = {}
    for key, value in state_dict.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, info: Mapping[str, Any] | None = None
) -> None:
    """Write a state dict in the original layout as ``.safetensors`` or as a Lightning-style ``.ckpt``, atomically
    (:func:`ldm.files.atomic_path`)."""
    path = Path(path)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in to_original_layout(state_dict).items()}
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(_unshare(state_dict), tmp, metadata={k: str(v) for k, v in (info or {}).items()})
        else:
            torch.save({"state_dict": state_dict, **(info or {})}, tmp)
