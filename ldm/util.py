"""Config-driven construction: ``target:`` + ``params:`` YAML nodes become objects.

Every entry point builds its model with :func:`instantiate_from_config` on a config loaded (and overridden from the
command line) with :func:`load_config`. Errors name the config path of the node at fault, e.g.
``model.params.unet_config.target``, because a traceback from deep inside a constructor does not tell a user which
line of their YAML is wrong.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import UserError
from ldm.modules.diffusionmodules.util import mean_flat as mean_flat
from ldm.text_images import log_txt_as_img as log_txt_as_img

# Placeholders the original configs use for "no model here": the first stage doubles as the cond stage, or there is
# no conditioning at all. Instantiating them yields None; the owning model knows what to do.
SPECIAL_TARGETS = ("__is_first_stage__", "__is_unconditional__")

# The face datasets of taming-transformers that the CelebA-HQ / FFHQ LDM configs train on.
FACES = ("CelebAHQTrain", "CelebAHQValidation", "FFHQTrain", "FFHQValidation")

# Targets that the originals' configs name in packages this project does not depend on, and the class here that
# takes their place (same constructor arguments; for models the same state-dict keys).
FOREIGN_TARGETS = {
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": (
        "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
    ),
    "taming.modules.vqvae.quantize.VectorQuantizer2": "ldm.modules.vqvae.quantize.VectorQuantizer",
    **{f"taming.data.faceshq.{name}": f"ldm.data.faces.{name}" for name in FACES},
    # Stability's sgm (SDXL): see ldm.models.diffusion.sgm_compat.
    "sgm.models.diffusion.DiffusionEngine": "ldm.models.diffusion.sgm_compat.DiffusionEngine",
    "sgm.modules.diffusionmodules.openaimodel.UNetModel": "ldm.models.diffusion.sgm_compat.UNetModel",
    "sgm.models.autoencoder.AutoencoderKL": "ldm.models.autoencoder.AutoencoderKL",
    "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": (
        "ldm.models.diffusion.sgm_compat.AutoencoderKLInferenceWrapper"
    ),
    "sgm.modules.GeneralConditioner": "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.GeneralConditioner": "ldm.modules.encoders.conditioner.GeneralConditioner",
    "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": "ldm.modules.encoders.fourier.ConcatTimestepEmbedderND",
    **{
        f"sgm.modules.encoders.modules.{name}": f"ldm.modules.encoders.modules.{name}"
        for name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")
    },
}

# The stack of (path, params) nodes being instantiated, so that a nested call made inside a constructor (for example
# LatentDiffusion building its UNet from ``unet_config``) can report its full config path.
_building: contextvars.ContextVar[tuple[tuple[str, Mapping[str, Any]], ...]] = contextvars.ContextVar(
    "_building", default=()
)


class ConfigError(UserError):
    """A config names something that does not exist or does not fit; the message says where and how to fix it."""


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``.

    Names in :data:`FOREIGN_TARGETS` give this project's stand-in. Raises ConfigError (naming the missing module or
    attribute) instead of a bare ImportError/AttributeError.
    """
    string = FOREIGN_TARGETS.get(string, string)
    module_name, _, attr = string.rpartition(".")
    if not module_name:
        raise ConfigError(f"'{string}' is not a dotted path such as 'ldm.models.autoencoder.AutoencoderKL'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"cannot import '{string}': no module named '{err.name}'.") from err
    if reload:
        module = importlib.reload(module)
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"cannot import '{string}': module '{module_name}' has no '{attr}'.{_suggest(attr, public)}")
    return getattr(module, attr)


def building_path() -> str:
    """The config path of the node being instantiated now (``model.params.first_stage_config``); "config" outside.

    For constructors that check a file their params name, so the error says which key of which node to fix.
    """
    stack = _building.get()
    return stack[-1][0] if stack else "config"


def _path_of(config: Any) -> str:
    """The config path of a node about to be instantiated, found in the params of the node being built around it."""
    stack = _building.get()
    if not stack:
        return "config"
    parent_path, parent_params = stack[-1]
    for key, value in parent_params.items():
        if value is config or (isinstance(value, Mapping | DictConfig) and value == config):
            return f"{parent_path}.params.{key}"
    return f"{parent_path}.params.<nested>"


def _accepted_names(target: Any) -> set[str] | None:
    """Keyword names ``target`` accepts, following ``**kwargs`` up the class hierarchy; None if open-ended."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if inspect.isclass(target):
        functions = [k.__dict__["__init__"] for k in inspect.getmro(target) if "__init__" in k.__dict__]
    else:
        functions = [target]
    names: set[str] = set()
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        names |= {n for n, p in parameters.items() if p.kind in keyword and n != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return names
    return None


def _check_params(target: Any, params: Mapping[str, Any], path: str) -> None:
    """Reject parameter names the constructor does not take, naming the bad one and the closest valid ones."""
    accepted = _accepted_names(target)
    if accepted is None:
        return
    name_of = getattr(target, "__qualname__", str(target))
    for name in params:
        if name not in accepted:
            raise ConfigError(f"{path}.params.{name}: {name_of} has no parameter '{name}'.{_suggest(name, accepted)}")
    try:
        required = inspect.signature(target).parameters.items()
    except (TypeError, ValueError):
        return
    missing = [
        name
        for name, p in required
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in params
    ]
    if missing:
        raise ConfigError(f"{path}.params: {name_of} needs {', '.join(repr(m) for m in missing)}.")


def instantiate_from_config(config: Any, path: str | None = None) -> Any:
    """Build ``target(**params)`` from a ``{target: ..., params: {...}}`` node.

    ``path`` is the node's location for error messages (``"model"`` for ``config.model``); nested calls made while a
    parent node is being built find their own path. The special targets ``__is_first_stage__`` and
    ``__is_unconditional__`` give None.
    """
    if path is None:
        path = _path_of(config)
    if isinstance(config, str) and config in SPECIAL_TARGETS:
        return None
    if not isinstance(config, Mapping | DictConfig):
        raise ConfigError(f"{path}: expected a mapping with 'target' and 'params', got {type(config).__name__}.")
    if "target" not in config:
        raise ConfigError(f"{path}: no 'target' key; every model node needs 'target: package.module.Class'.")
    target = config["target"]
    if target in SPECIAL_TARGETS:
        return None
    try:
        cls = get_obj_from_str(str(target))
    except ConfigError as err:
        raise ConfigError(f"{path}.target: {err}") from None
    if not callable(cls):
        # Functions are fine (some configs name factories); a constant or a module cannot build anything.
        raise ConfigError(
            f"{path}.target: '{target}' is a {type(cls).__name__}, not a class or function; name the class to build, "
            "e.g. 'ldm.modules.diffusionmodules.openaimodel.UNetModel'."
        )
    params = config.get("params", None) or {}
    if not isinstance(params, Mapping | DictConfig):
        raise ConfigError(f"{path}.params: expected a mapping, got {type(params).__name__}.")
    _check_params(cls, params, path)
    token = _building.set(_building.get() + ((path, params),))
    try:
        return cls(**params)
    finally:
        _building.reset(token)


def load_config(paths: str | Path | Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Load YAML files merged left to right, then apply ``key.sub=value`` dotlist overrides.

    This is the one way scripts and ``main.py`` read configs, so overrides work the same in every entry point.
    A later file's dataset (``data``, ``data.params.train`` / ``validation`` / ``test``) with another ``target``
    replaces the earlier one instead of merging into it (:func:`_drop_replaced_datasets`).
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    configs = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"config file '{p}' does not exist.")
        try:
            config = OmegaConf.load(p)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{p}' is not valid YAML: {_yaml_problem(err)}; fix that line.") from None
        except (OmegaConfBaseException, ValueError) as err:
            raise ConfigError(f"config file '{p}' is not valid YAML: {err}") from err
        if not isinstance(config, DictConfig):
            raise ConfigError(
                f"config file '{p}' holds a {type(config).__name__.removesuffix('Config').lower()} at its top level; "
                "a config is a mapping of keys such as 'model:' (target and params)."
            )
        if configs:
            _drop_replaced_datasets(configs[-1], config)
        configs.append(config)
    return apply_overrides(OmegaConf.merge(*configs) if configs else OmegaConf.create(), overrides)


def _drop_replaced_datasets(earlier: DictConfig, later: DictConfig) -> None:
    """Remove from ``earlier`` (in place) each dataset node that ``later`` gives with another ``target``: dataset
    classes take different parameters (a CaptionFolder's ``size`` is no KohyaFolder's), so merging the two would
    build the new class with the old one's settings. Model sections still merge (an overlay may change the class and
    keep the parameters)."""
    for parent, key, replacement in _dataset_nodes(earlier, later):
        if parent[key].get("target") != replacement.get("target"):
            del parent[key]


def _dataset_nodes(earlier: DictConfig, later: DictConfig) -> list[tuple[DictConfig, str, DictConfig]]:
    """``(parent in earlier, key, later's node)`` for ``earlier``'s ``data`` node and the datasets under it that
    ``later`` also sets with a ``target``; innermost first, so a replaced ``data`` node is looked at last."""
    found = []
    data, data_later = earlier.get("data"), later.get("data")
    if not isinstance(data, DictConfig) or not isinstance(data_later, DictConfig):
        return found
    params, params_later = data.get("params"), data_later.get("params")
    if isinstance(params, DictConfig) and isinstance(params_later, DictConfig):
        for split in ("train", "validation", "test"):
            node, node_later = params.get(split), params_later.get(split)
            if isinstance(node, DictConfig) and isinstance(node_later, DictConfig) and "target" in node_later:
                found.append((params, split, node_later))
    if "target" in data_later:
        found.append((earlier, "data", data_later))
    return found


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint without its multi-line context: the problem and where it is, 1-based."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(config: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge OmegaConf dotlist overrides (``model.params.scale_factor=0.13``) into ``config``; returns a new config."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key.sub=value.")
    try:
        return OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot apply overrides {list(overrides)}: {err}") from err


def config_value(config: Any, path: str, default: Any = None) -> Any:
    """The value at the dotted ``path`` of ``config``, ``default`` where a key is missing or null.

    ConfigError naming the node when something along the path is not a mapping (``model=5``).
    """
    node = config
    keys = path.split(".")
    for i, key in enumerate(keys):
        if not isinstance(node, Mapping | DictConfig):
            where = ".".join(keys[:i]) or "config"
            kind = type(node).__name__
            raise ConfigError(f"{where}: expected a mapping (key: value), got {kind} {node!r}; fix the config.")
        node = node.get(key)
        if node is None:
            return default
    return node


def positive_int(value: Any, path: str, meaning: str = "") -> int:
    """``value`` if it is a positive integer, else ConfigError naming ``path`` (and what it means, if given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path} must be a positive integer{meaning}, got {to_container(value)!r}; fix the config.")
    return value


def positive_ints(value: Any, path: str) -> list[int]:
    """``value`` if it is a non-empty list of positive integers, else ConfigError naming ``path``."""
    values = list(value) if isinstance(value, ListConfig | list | tuple) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(
            f"{path} must be a list of positive integers, one per resolution level such as [1, 2, 4, 4], "
            f"got {to_container(value)!r}; fix the config."
        )
    return values


def to_container(config: Any) -> Any:
    """Plain dicts/lists from an OmegaConf node (or the value itself)."""
    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def default_device() -> torch.device:
    """The best device here: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def ismap(x: Any) -> bool:
    """Whether ``x`` is a batch of maps with more channels than an image: a (B, C > 3, H, W) tensor."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """Whether ``x`` is a batch of grey or RGB images: a (B, 1 or 3, H, W) tensor."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def exists(x: Any) -> bool:
    return x is not None


def default(value: Any, fallback: Any) -> Any:
    """``value`` unless it is None; ``fallback`` is called if it is a function."""
    if value is not None:
        return value
    return fallback() if inspect.isfunction(fallback) else fallback
