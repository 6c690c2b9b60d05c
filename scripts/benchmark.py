"""Seconds and peak memory of this project's txt2img next to diffusers', on the same weights and the same machine.

    python scripts/benchmark.py       # SD 1.5 architecture, random weights, 256x256, fp32: ~2.7 min on 2 CPU cores
    python scripts/benchmark.py --dtype bf16 --json bench.json
    python scripts/benchmark.py --device cuda --dtype fp16 --H 512 --W 512 --steps 20 --n 10 --ckpt sd-v1-5.safetensors
    python scripts/benchmark.py --config models/ldm/shapes/config.yaml --ckpt models/ldm/shapes/model.safetensors \
        --H 64 --W 64

The model is the architecture of ``--config`` (default ``configs/stable-diffusion/v1-inference.yaml``) with the
weights of ``--ckpt``, or seeded random ones: PyTorch's default initialisation, plus small seeded noise in the layers
the architecture starts at zero (a zero output convolution would make every UNet output zero and the cross-check
meaningless). diffusers gets the very same tensors through its own converters for original-layout checkpoints
(``diffusers.loaders.single_file_utils``), into models built empty and given those tensors, as diffusers' own
loader does when ``accelerate`` is installed; its text encoder is a transformers ``CLIPTextModel`` with our encoder's
config, and its ``CLIPTokenizer`` is built from the CLIP BPE vocabulary that ships with open_clip (written as
``vocab.json`` / ``merges.txt`` to a temporary folder), so prompts go through each pipeline's own tokenizer; nothing
is fetched from a model hub. The run then

1. checks that both UNets compute the same function on the same input, and stops (exit 1) when the largest
   difference exceeds a small fraction of the output's scale: the conversion or the architecture would differ;
2. times one UNet forward at batch 2 (one classifier-free guidance step) and one whole txt2img (text encoding,
   ``--steps`` DDIM steps at guidance scale 7.5, VAE decode, conversion to a PIL image), for each engine in turn
   (A B A B ...) after a warm-up, and reports the median of ``--n`` runs. Both samplers are DDIM with SD's schedule:
   ``Pipeline.generate(sampler="ddim")`` and ``StableDiffusionPipeline`` with a ``DDIMScheduler`` set up like SD
   (scaled_linear betas, steps_offset 1, set_alpha_to_one False, clip_sample False), from the same start noise;
   the mean difference of their images is reported as a second check;
3. measures the peak memory of the same txt2img job for each engine in its own fresh process, which loads the
   weights from a file the benchmark writes once: peak resident set size on the CPU (the kernel's high-water mark,
   which ``ru_maxrss`` reports), ``torch.cuda.max_memory_allocated`` on CUDA. "whole process" includes loading the
   weights; "txt2img" counts from after loading (Linux and CUDA only).

Ratios are this project over diffusers: below 1 means this project is faster or smaller.

Fast paths: ``--channels_last``, ``--compile``, ``--attention_slicing`` and ``--vae_tiling`` go to
``Pipeline.from_config`` and switch on diffusers' counterparts, so the comparison stays like for like:
``.to(memory_format=torch.channels_last)`` on its UNet and VAE, ``torch.compile`` of its UNet,
``enable_attention_slicing("auto")`` (diffusers slices over heads, not query rows, so any slice size maps to its
"auto") and ``vae.enable_tiling()``.

Default run time (2 DDIM steps, 3 runs), estimated for the project's 2-core CPU, where an SD 1.5 UNet forward at
batch 2 takes ~2.5 s and a VAE decode at 256x256 (~0.6 TFLOP) ~4 s: imports, random weights and loading both
engines ~30 s; check and UNet timings (1 + 3 forwards each) ~20 s; txt2img warm-up (1 step) and 3 x 2 timed runs
(~9.5 s each) ~70 s; two memory processes ~40 s: about 160 s in all (the report prints the actual time). Each extra
step adds ~2.5 s to each of the 8 txt2img runs, ~20 s in all; ``--steps 20`` gives the step/decode mix of real use.

Without diffusers (``pip install -r requirements-bench.txt``), or with ``--skip-diffusers``, only this project is
measured. Bad input ends the run with one line ``error: ...`` and exit code 2, as in the other scripts; engines that
disagree (step 1) end it with ``error: ...`` and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import ldm
from ldm import to_diffusers
from ldm.checkpoint import CheckpointError, load_model_from_config, read_checkpoint, save_checkpoint, to_original_layout
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, print_error
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.models.diffusion.noise import Noise
from ldm.util import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"
INSTALL_HINT = "pip install -r requirements-bench.txt"
PROMPT = "a painting of a virus monster playing guitar"
GUIDANCE_SCALE = 7.5
UNET_TIMESTEP = 500
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_OF_DTYPE = {"fp32": "full", "bf16": "bf16", "fp16": "fp16"}
# Largest accepted max|ldm - diffusers| / max|ldm| of the UNet outputs. Half precision rounds differently in the two
# implementations; a conversion error (a swapped or missing tensor) gives differences of the output's own size.
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}
SD_TEXT_ENCODER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
ENGINES = ("ldm", "diffusers")


class EnginesDiffer(RuntimeError):
    """The two engines do not compute the same thing from the same weights, so timing them would compare nothing."""


# ---------------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark's job, as passed to the memory processes (JSON)."""

    device: str
    dtype: str
    height: int
    width: int
    steps: int
    repeats: int
    seed: int
    channels_last: bool = False
    compile: bool = False
    attention_slicing: int | str | None = None
    vae_tiling: bool = False

    def fast_path_options(self) -> dict[str, Any]:
        """``Pipeline.from_config`` keyword arguments of the fast paths asked for (only those)."""
        options = {"channels_last": self.channels_last, "compile": self.compile, "vae_tiling": self.vae_tiling}
        options = {name: True for name, given in options.items() if given}
        if self.attention_slicing is not None:
            options["attention_slicing"] = self.attention_slicing
        return options


@dataclasses.dataclass
class Plan:
    """A checked request: the resolved config, where the weights come from, the job, and which engines run."""

    config: DictConfig
    config_label: str
    ckpt: Path | None
    settings: Settings
    engines: tuple[str, ...]
    command: str


def _slice_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"attention slice size must be a positive integer or 'auto', got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(
        prog="scripts/benchmark.py",
        description="Time this project's UNet and txt2img against diffusers on the same weights; see the module "
        "docstring for what is measured and how.",
        epilog="Trailing key=value arguments override the config, e.g. model.params.scale_factor=0.18215.",
    )
    add = parser.add_argument
    add("--config", type=str, default=None, help=f"model config (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    add("--ckpt", type=str, default=None, help="weights to load (default: seeded random weights)")
    add("--device", type=str, default="auto", help="cpu, cuda, cuda:N or mps (default auto: the best available)")
    add("--dtype", choices=list(DTYPES), default="fp32", help="weights and compute type (fp16 needs a GPU)")
    add("--H", type=int, default=256, help="image height in pixels (default 256)")
    add("--W", type=int, default=256, help="image width in pixels (default 256)")
    add("--steps", type=int, default=2, help="DDIM steps of the timed txt2img (default 2, to stay within 3 min)")
    add("--n", type=int, default=3, help="timed runs per engine and measurement; the median is reported (default 3)")
    add("--seed", type=int, default=42, help="seed of the random weights, the UNet input and the start noise")
    add("--channels_last", action="store_true", help="channels_last memory format (both engines)")
    add("--compile", action="store_true", help="torch.compile the UNet (both engines)")
    add(
        "--attention_slicing",
        type=_slice_size,
        nargs="?",
        const="auto",
        default=None,
        metavar="N|auto",
        help="attention in slices of N query rows, or 'auto' (diffusers: its 'auto' slicing)",
    )
    add("--vae_tiling", action="store_true", help="decode the VAE by tiles (both engines)")
    add("--json", type=str, default=None, metavar="PATH", help="also write the results as JSON to PATH")
    add("--skip-diffusers", dest="skip_diffusers", action="store_true", help="measure this project only")
    add("--memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def check_dtype(dtype: str, device: torch.device) -> None:
    """ValueError unless ``dtype`` runs on ``device``."""
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("--dtype fp16 needs a GPU (the CPU has no fast float16); use fp32 or bf16 on the CPU.")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use --dtype fp16 or fp32.")


def check_diffusers_support(config: DictConfig, height: int, width: int) -> None:
    """ValueError unless diffusers' StableDiffusionPipeline can run this config's model at this size."""
    params = config.model.get("params") or {}
    hint = "; use --skip-diffusers to measure this project alone."
    text = params.get("cond_stage_config") or {}
    if text.get("target") != SD_TEXT_ENCODER or (text.get("params") or {}).get("layer", "last") != "last":
        raise ValueError(f"the diffusers comparison needs an SD 1.x text encoder ({SD_TEXT_ENCODER}, layer last){hint}")
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise ValueError(f"the diffusers comparison needs the SD (linear) beta schedule{hint}")
    if params.get("parameterization", "eps") not in ("eps", "v"):
        raise ValueError(f"the diffusers comparison needs an eps- or v-prediction model{hint}")
    if height % 8 or width % 8:
        raise ValueError(f"diffusers needs image sides that are multiples of 8, got {width}x{height}{hint}")


def plan(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    """Check every input (without loading weights) and decide which engines run."""
    config_path = Path(args.config) if args.config is not None else DEFAULT_CONFIG
    config = load_config(config_path, args.overrides)
    geometry = LatentGeometry.from_config(config)
    if config.model.params.get("conditioning_key") != "crossattn":
        raise ValueError("the benchmark needs a text-to-image model (conditioning_key: crossattn), such as SD's.")
    geometry.check_size(args.H, args.W)
    if not 1 <= args.steps <= geometry.timesteps:
        raise ValueError(f"--steps must be in 1..{geometry.timesteps}, got {args.steps}.")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}.")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json {args.json}: its folder does not exist.")
    ckpt = Path(args.ckpt) if args.ckpt is not None else None
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint '{args.ckpt}' does not exist; check --ckpt.")
    device = resolve_device(None if args.device == "auto" else args.device)
    check_dtype(args.dtype, device)
    engines: tuple[str, ...] = ENGINES
    if args.skip_diffusers:
        engines = ("ldm",)
    elif not diffusers_available():
        print(f"note: diffusers is not installed, so only this project is measured ({INSTALL_HINT}).", file=sys.stderr)
        engines = ("ldm",)
    else:
        check_diffusers_support(config, args.H, args.W)
    settings = Settings(
        device=str(device),
        dtype=args.dtype,
        height=args.H,
        width=args.W,
        steps=args.steps,
        repeats=args.n,
        seed=args.seed,
        channels_last=args.channels_last,
        compile=args.compile,
        attention_slicing=args.attention_slicing,
        vae_tiling=args.vae_tiling,
    )
    return Plan(
        config=config,
        config_label=_shown(config_path),
        ckpt=ckpt,
        settings=settings,
        engines=engines,
        command=shlex.join(["python", "scripts/benchmark.py", *argv]),
    )


def _shown(path: Path) -> str:
    """A path relative to the project root when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def random_weights(config: DictConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the config's model, in the original checkpoint layout.

    PyTorch's (and transformers') default initialisation, then every layer that starts at zero (the UNet's output
    convolution, each ResBlock's last convolution, each transformer's ``proj_out``) gets the default initialisation
    of its shape too, so the UNet's output depends on every block.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model_from_config(config, None, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.any():
                _fill_default(module, generator)
    return model.state_dict()


def _fill_default(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Uniform in +-1/sqrt(fan_in), the bound of PyTorch's default Linear/Conv initialisation, for weight and bias."""
    bound = module.weight[0].numel() ** -0.5
    for tensor in (module.weight, getattr(module, "bias", None)):
        if isinstance(tensor, torch.Tensor):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * (2 * bound) - bound)


def write_weights(plan: Plan, folder: Path) -> Path:
    """The file both engines load: ``--ckpt`` itself, or the random weights written once to ``folder``."""
    if plan.ckpt is not None:
        return plan.ckpt
    path = folder / "random-weights.safetensors"
    save_checkpoint(random_weights(plan.config, plan.settings.seed), path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The two engines: a UNet forward and a whole txt2img each, on the same weights file


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def start_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The txt2img start latent (1, C, h, w) that ``Pipeline.generate`` draws for ``seed``, given to diffusers too."""
    return Noise([seed]).randn(shape)


class LdmEngine:
    """This project's ``Pipeline`` (ldm.inference), with the fast paths of ``settings``."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings) -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        self.pipe = Pipeline.from_config(
            config,
            weights,
            device=self.device,
            precision=PRECISION_OF_DTYPE[settings.dtype],
            **settings.fast_path_options(),
        )
        # Image metadata is not needed here, and hashing a multi-GB weights file would land in the first txt2img.
        self.pipe.ckpt = None

    def _autocast(self) -> AbstractContextManager:
        # As Pipeline.generate runs the model: half-precision weights under autocast, float32 sampler state.
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (2, C, h, w) for latents x: (2, C, h, w), timesteps t: (2,), context (2, L, D)."""
        with self._autocast():
            return self.pipe.model.apply_model(x, t, context.to(self.dtype))

    def txt2img(self, steps: int) -> np.ndarray:
        """One image (H, W, 3) uint8 of the benchmark prompt, ``steps`` DDIM steps, CFG at batch 2."""
        s = self.settings
        result = self.pipe.generate(
            PROMPT,
            steps=steps,
            sampler="ddim",
            scale=GUIDANCE_SCALE,
            seed=s.seed,
            height=s.height,
            width=s.width,
            eta=0.0,
            progress=False,
        )
        return np.asarray(result.images[0])

    def token_ids(self, prompt: str) -> list[int]:
        return self.pipe.model.cond_stage_model.tokenizer([prompt])[0].tolist()


class DiffusersEngine:
    """diffusers' ``StableDiffusionPipeline`` on the same weights, converted by diffusers' own functions."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        # The pipeline warns that it has no safety checker, which is on purpose here.
        diffusers_logging.set_verbosity_error()
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        self.geometry = LatentGeometry.from_config(config)
        state_dict = to_original_layout(read_checkpoint(weights)[0])
        text_encoder, tokenizer = to_diffusers.text_encoder(config, state_dict)
        unet, vae = to_diffusers.unet_and_vae(config, state_dict)
        del state_dict
        self.pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=to_diffusers.ddim_scheduler(config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.to(device=self.device, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        apply_diffusers_fast_paths(self.pipe, settings)

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """As :meth:`LdmEngine.unet`; diffusers runs in the weights' dtype."""
        return self.pipe.unet(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype), return_dict=False)[0]

    def txt2img(self, steps: int) -> np.ndarray:
        """As :meth:`LdmEngine.txt2img`, from the same start noise."""
        s = self.settings
        shape = self.geometry.latent_shape(1, s.height, s.width)
        output = self.pipe(
            PROMPT,
            height=s.height,
            width=s.width,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            latents=start_noise(shape, s.seed).to(self.device, self.dtype),
            output_type="pil",
        )
        return np.asarray(output.images[0])

    def token_ids(self, prompt: str) -> list[int]:
        tokenizer = self.pipe.tokenizer
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


Engine = LdmEngine | DiffusersEngine
ENGINE_CLASSES = {"ldm": LdmEngine, "diffusers": DiffusersEngine}


def build_engine(name: str, config: DictConfig, weights: Path, settings: Settings) -> Engine:
    """Load engine ``name`` ("ldm" or "diffusers") with the weights file and the settings' dtype and fast paths."""
    return ENGINE_CLASSES[name](config, weights, settings)


def apply_diffusers_fast_paths(pipe: Any, settings: Settings) -> None:
    """diffusers' counterparts of the fast paths given to our pipeline (see the module docstring)."""
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.attention_slicing is not None:
        pipe.enable_attention_slicing("auto")
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.compile:
        pipe.unet.compile()


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def unet_inputs(config: DictConfig, settings: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded float32 UNet inputs of one CFG step: x (2, C, h, w), t (2,), context (2, L, D), on the device."""
    geometry = LatentGeometry.from_config(config)
    unet_params = config.model.params.unet_config.params
    context_length = int((config.model.params.cond_stage_config.get("params") or {}).get("max_length", 77))
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.randn(geometry.latent_shape(2, settings.height, settings.width), generator=generator)
    context = torch.randn(2, context_length, int(unet_params.context_dim), generator=generator)
    t = torch.full((2,), UNET_TIMESTEP, dtype=torch.long)
    device = torch.device(settings.device)
    return x.to(device), t.to(device), context.to(device)


def check_unets(engines: dict[str, Engine], inputs: tuple[torch.Tensor, ...], dtype: str) -> dict[str, float]:
    """Run both UNets on the same input (which also warms them up); EnginesDiffer when they disagree."""
    ours = engines["ldm"].unet(*inputs).float()
    theirs = engines["diffusers"].unet(*inputs).float()
    scale = ours.abs().max().item()
    difference = (ours - theirs).abs().max().item()
    if not difference <= CHECK_TOLERANCE[dtype] * scale:
        raise EnginesDiffer(
            f"the UNets differ on the same input: max |ldm - diffusers| = {difference:.3g} against max |output| = "
            f"{scale:.3g} (allowed: {CHECK_TOLERANCE[dtype]:g} of it); the weight conversion or the architecture "
            "differs, so their timings would not be comparable."
        )
    return {"unet_max_abs_diff": difference, "unet_max_abs_output": scale, "unet_tolerance": CHECK_TOLERANCE[dtype]}


def check_tokenizers(engines: dict[str, Engine]) -> None:
    """EnginesDiffer unless both pipelines tokenize the benchmark prompt alike."""
    ours, theirs = engines["ldm"].token_ids(PROMPT), engines["diffusers"].token_ids(PROMPT)
    if ours != theirs:
        raise EnginesDiffer(f"the tokenizers disagree on '{PROMPT}': {ours[:12]}... against {theirs[:12]}...")


def interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Seconds of ``repeats`` runs of each call, taking turns (A B A B ...) so that drifts of the machine (heat,
    other load) hit every engine alike. Returns the times and each call's last result."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            last[name] = call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, last


def summary(values: dict[str, Any]) -> dict[str, Any]:
    """Per-engine medians (of lists) or values, plus the ratio ldm/diffusers when both are there."""
    out = {name: statistics.median(v) if isinstance(v, list) else v for name, v in values.items()}
    if out.get("ldm") is not None and out.get("diffusers"):
        out["ratio"] = out["ldm"] / out["diffusers"]
    if any(isinstance(v, list) for v in values.values()):
        out["runs"] = values
    return out


# Peak memory, measured in a fresh process per engine


def peak_memory(device: torch.device) -> int:
    """This process's peak memory in bytes: CUDA allocations on CUDA, else resident set size.

    On Linux the RSS peak is read as VmHWM, the high-water mark that ``ru_maxrss`` also reports, because it can be
    restarted (:func:`reset_peak_memory`).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak count from the current usage; False where the platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: "5" resets the RSS high-water mark
    except OSError:
        return False
    return True


def memory_child(spec_path: str) -> int:
    """The body of a memory process: load one engine, run the txt2img job once, print its peaks as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    settings = Settings(**spec["settings"])
    device = torch.device(settings.device)
    engine = build_engine(spec["engine"], load_config(spec["config"]), Path(spec["weights"]), settings)
    loading = peak_memory(device)
    resettable = reset_peak_memory(device)
    engine.txt2img(settings.steps)
    job = peak_memory(device)
    print(json.dumps({"process": max(loading, job), "txt2img": job if resettable else None}))
    return 0


def measure_memory(engine: str, config_file: Path, weights: Path, settings: Settings) -> dict[str, int | None]:
    """Peak memory of the txt2img job with ``engine``, in a fresh Python process (so no other peak mixes in)."""
    spec = config_file.parent / f"memory-{engine}.json"
    spec.write_text(json.dumps({"engine": engine, "config": str(config_file), "weights": str(weights),
                                "settings": dataclasses.asdict(settings)}))  # fmt: skip
    # The child imports the same ldm package as this process, wherever it was imported from.
    env = dict(os.environ)
    package_root = str(Path(ldm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory process of {engine} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark


def _note(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def run_benchmark(plan: Plan) -> dict[str, Any]:
    """Everything the module docstring lists, as a JSON-ready dict."""
    started = time.perf_counter()
    s = plan.settings
    with tempfile.TemporaryDirectory(prefix="ldm-benchmark-") as tmp:
        if plan.ckpt is None:
            _note(f"making seeded random weights for {plan.config_label}")
        weights = write_weights(plan, Path(tmp))
        config_file = Path(tmp) / "config.yaml"
        OmegaConf.save(plan.config, config_file)
        times, checks = time_engines(plan, weights)
        gc.collect()  # the engines are gone; the memory processes should not compete with them for RAM
        memory = {}
        for name in plan.engines:
            _note(f"measuring the peak memory of {name} in a fresh process")
            memory[name] = measure_memory(name, config_file, weights, s)
    return {
        "command": plan.command,
        "machine": machine_info(torch.device(s.device), plan.engines),
        "model": {"config": plan.config_label, "weights": str(plan.ckpt) if plan.ckpt else f"random (seed {s.seed})"},
        "settings": dataclasses.asdict(s),
        "checks": checks,
        "results": {
            "unet_forward_s": summary(times["unet"]),
            "txt2img_s": summary(times["txt2img"]),
            "peak_memory_bytes": summary({name: m["process"] for name, m in memory.items()}),
            "peak_memory_txt2img_bytes": summary({name: m["txt2img"] for name, m in memory.items()}),
        },
        "elapsed_s": time.perf_counter() - started,
    }


def time_engines(plan: Plan, weights: Path) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Load the engines, cross-check them, and time the UNet forward and txt2img of each, interleaved.

    Returns ``({"unet": times, "txt2img": times}, checks)`` with times per engine in seconds.
    """
    s = plan.settings
    device = torch.device(s.device)
    _note(f"loading {' and '.join(plan.engines)}")
    engines = {name: build_engine(name, plan.config, weights, s) for name in plan.engines}
    inputs = unet_inputs(plan.config, s)
    checks: dict[str, Any] = {}
    if "diffusers" in engines:
        check_tokenizers(engines)
        checks.update(check_unets(engines, inputs, s.dtype))  # which is also the UNets' warm-up
    else:
        engines["ldm"].unet(*inputs)

    _note(f"timing the UNet forward ({s.repeats} runs each)")
    unet_calls = {name: functools.partial(engine.unet, *inputs) for name, engine in engines.items()}
    unet_times, _ = interleaved(unet_calls, s.repeats, device)

    _note(f"timing txt2img ({s.steps} steps, {s.repeats} runs each, after a 1-step warm-up)")
    interleaved({name: functools.partial(engine.txt2img, 1) for name, engine in engines.items()}, 1, device)
    txt2img_calls = {name: functools.partial(engine.txt2img, s.steps) for name, engine in engines.items()}
    txt2img_times, images = interleaved(txt2img_calls, s.repeats, device)
    if "diffusers" in images:
        difference = np.abs(images["ldm"].astype(np.float64) - images["diffusers"].astype(np.float64)).mean()
        checks["image_mean_abs_diff"] = float(difference)
    return {"unet": unet_times, "txt2img": txt2img_times}, checks


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, engines: Sequence[str]) -> dict[str, Any]:
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if "diffusers" in engines:
        import diffusers

        info["diffusers"] = diffusers.__version__
    return info


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: machine, command, table of medians and ratios, checks."""
    m, s, r = report["machine"], report["settings"], report["results"]
    engines = [name for name in ENGINES if name in r["txt2img_s"]]
    memory_kind = "CUDA allocated" if s["device"].startswith("cuda") else "RSS"
    rows = [
        ("UNet forward, batch 2", r["unet_forward_s"], _seconds),
        (f"txt2img, {s['steps']} DDIM steps", r["txt2img_s"], _seconds),
        (f"peak memory ({memory_kind}), whole process", r["peak_memory_bytes"], _bytes),
        (f"peak memory ({memory_kind}), txt2img", r["peak_memory_txt2img_bytes"], _bytes),
    ]
    header = (
        f"{'':36s}" + "".join(f"{name:>14s}" for name in engines) + ("   ldm/diffusers" if len(engines) > 1 else "")
    )
    lines = [
        f"machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}"
        + (f", diffusers {m['diffusers']}" if "diffusers" in m else "")
        + f", device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else ""),
        f"command: {report['command']}",
        f"model:   {report['model']['config']}, weights {report['model']['weights']}",
        f"job:     {s['width']}x{s['height']}, {s['dtype']}, guidance {GUIDANCE_SCALE}; median of {s['repeats']} "
        "interleaved runs after a warm-up; memory from one run per engine in a fresh process",
        "",
        header,
    ]
    for label, values, show in rows:
        ratio = values.get("ratio")
        cells = "".join(f"{show(values.get(name)):>14s}" for name in engines)
        lines.append(f"{label:36s}{cells}" + (f"{ratio:16.2f}" if ratio is not None else ""))
    checks = report["checks"]
    if checks:
        lines += [
            "",
            f"check: UNet max |ldm - diffusers| = {checks['unet_max_abs_diff']:.2e} "
            f"(max |output| {checks['unet_max_abs_output']:.3g}); "
            f"txt2img images differ by {checks['image_mean_abs_diff']:.2f}/255 on average",
        ]
    lines.append(f"total time: {report['elapsed_s']:.0f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    if args.memory_child is not None:
        return memory_child(args.memory_child)
    try:
        report = run_benchmark(plan(args, argv))
    except (ConfigError, CheckpointError, ValueError, OSError) as err:
        return print_error(err)
    except (EnginesDiffer, to_diffusers.ConversionError) as err:
        return print_error(err, code=1)
    print(format_report(report))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
