"""The benchmark's command line and its checks: every input is refused in one line before any weights are made.

:func:`plan` turns the parsed arguments into a :class:`Plan` (config, weights, :class:`Settings`, engines).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ldm.cli import ROOT, find_checkpoint, parse_slice_size
from ldm.cli_parser import DEFAULT_CONFIG
from ldm.devices import check_precision, resolve_device
from ldm.errors import ScriptParser, UserError
from ldm.geometry import LatentGeometry
from ldm.util import load_config

INSTALL_HINT = "pip install -r requirements-bench.txt"
PROMPT = "a painting of a virus monster playing guitar"
GUIDANCE_SCALE = 7.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_OF_DTYPE = {"fp32": "full", "bf16": "bf16", "fp16": "fp16"}
SD_TEXT_ENCODER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
# ldm-openvino: this project with --engine openvino; openvino-diffusers: OpenVINO running diffusers' networks
# directly; sdcpp: stable-diffusion.cpp through stable-diffusion-cpp-python, reading the same .safetensors file.
ENGINES = ("ldm", "ldm-openvino", "diffusers", "openvino-diffusers", "sdcpp")
OPENVINO_ENGINES = ("ldm-openvino", "openvino-diffusers")
DIFFUSERS_ENGINES = ("diffusers", "openvino-diffusers")
OPENVINO_HINT = "pip install -r requirements-openvino.txt"
SDCPP_HINT = "pip install stable-diffusion-cpp-python (it builds stable-diffusion.cpp, which takes a while)"


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
    sizes: tuple[int, ...] = ()  # also time every engine at these square sizes (the plot, the cost growth)
    batches: tuple[int, ...] = ()  # also time the UNet step at these numbers of images

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
    plot: Path | None = None
    memory: bool = True  # measure each engine's peak memory in a fresh process


def _slice_size(text: str) -> int | str:
    """``--attention_slicing``'s value as :func:`ldm.cli.parse_slice_size` reads it, refused as a usage error."""
    try:
        return parse_slice_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"attention slice size must be a positive integer or 'auto', got '{text}'"
        ) from None


def _engine_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in ENGINES]
    if unknown or not names:
        given = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown engine {given}; choose from {','.join(ENGINES)}")
    return names


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got '{text}'")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(
        prog="scripts/benchmark.py",
        description="Time this project's UNet and txt2img against diffusers on the same weights; see the module "
        "docstring for what is measured and how.",
        epilog="Trailing key=value arguments override the config, e.g. model.params.scale_factor=0.18215.",
    )
    add = parser.add_argument
    add("--config", type=str, default=None, help=f"model config (default {DEFAULT_CONFIG})")
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
    add(
        "--skip-memory",
        dest="skip_memory",
        action="store_true",
        help="times only: no peak memory (each engine's memory run is a fresh process that loads it again)",
    )
    add(
        "--engines",
        type=_engine_list,
        default=None,
        metavar="A,B,...",
        help=f"the engines to measure, from {','.join(ENGINES)} (default: ldm,diffusers, or ldm without diffusers)",
    )
    add(
        "--sizes",
        type=_int_list,
        default=(),
        metavar="256,384,512",
        help="also time the UNet step and txt2img of every engine at these square sizes (cost growth, the plot)",
    )
    add(
        "--batches",
        type=_int_list,
        default=(),
        metavar="1,2,4",
        help="also time the UNet step of every engine at these numbers of images (CFG doubles the batch)",
    )
    add("--plot", type=str, default=None, metavar="PATH", help="a PNG of seconds per image against --sizes")
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_engines(args: argparse.Namespace, device: torch.device) -> tuple[str, ...]:
    """The engines to run: ``--engines`` checked (a missing optional package is refused with its install command;
    stable-diffusion.cpp is left out with a note), or the default pair."""
    if args.engines is None:
        if args.skip_diffusers:
            return ("ldm",)
        if not diffusers_available():
            print(f"note: diffusers is not installed, so only this project is measured ({INSTALL_HINT}).",
                  file=sys.stderr)  # fmt: skip
            return ("ldm",)
        return ENGINES[:1] + ("diffusers",)
    engines = tuple(e for e in args.engines if not (args.skip_diffusers and e in DIFFUSERS_ENGINES))
    if "sdcpp" in engines and not installed("stable_diffusion_cpp"):
        print(f"note: stable-diffusion-cpp-python is not installed, so sdcpp is left out ({SDCPP_HINT}).",
              file=sys.stderr)  # fmt: skip
        engines = tuple(e for e in engines if e != "sdcpp")
    if any(e in DIFFUSERS_ENGINES for e in engines) and not diffusers_available():
        raise UserError(f"the engines {', '.join(e for e in engines if e in DIFFUSERS_ENGINES)} need diffusers: "
                        f"{INSTALL_HINT}")  # fmt: skip
    if any(e in OPENVINO_ENGINES for e in engines):
        if not installed("openvino"):
            raise UserError(f"the engines {', '.join(e for e in engines if e in OPENVINO_ENGINES)} need OpenVINO: "
                            f"{OPENVINO_HINT}")  # fmt: skip
        if device.type != "cpu" or args.dtype == "fp16":
            raise UserError("the OpenVINO engines run on the CPU in fp32 or bf16: give --device cpu and --dtype "
                            "fp32 or bf16.")  # fmt: skip
    if not engines:
        raise UserError("no engine is left to measure; name one in --engines.")
    return engines


def check_diffusers_support(config: DictConfig, height: int, width: int) -> None:
    """ValueError unless diffusers' StableDiffusionPipeline can run this config's model at this size."""
    params = config.model.get("params") or {}
    hint = "; use --skip-diffusers to measure this project alone."
    text = params.get("cond_stage_config") or {}
    if text.get("target") != SD_TEXT_ENCODER or (text.get("params") or {}).get("layer", "last") != "last":
        raise UserError(f"the diffusers comparison needs an SD 1.x text encoder ({SD_TEXT_ENCODER}, layer last){hint}")
    if params.get("beta_schedule", "linear") != "linear" or params.get("given_betas") is not None:
        raise UserError(f"the diffusers comparison needs the SD (linear) beta schedule{hint}")
    if params.get("parameterization", "eps") not in ("eps", "v"):
        raise UserError(f"the diffusers comparison needs an eps- or v-prediction model{hint}")
    if height % 8 or width % 8:
        raise UserError(f"diffusers needs image sides that are multiples of 8, got {width}x{height}{hint}")


def plan(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    """Check every input (without loading weights) and decide which engines run."""
    config_path = Path(args.config) if args.config is not None else ROOT / DEFAULT_CONFIG
    config = load_config(config_path, args.overrides)
    geometry = LatentGeometry.from_config(config)
    if config.model.params.get("conditioning_key") != "crossattn":
        raise UserError("the benchmark needs a text-to-image model (conditioning_key: crossattn), such as SD's.")
    geometry.check_size(args.H, args.W)
    if not 1 <= args.steps <= geometry.timesteps:
        raise UserError(f"--steps must be in 1..{geometry.timesteps}, got {args.steps}.")
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}.")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: its folder does not exist.")
    ckpt = find_checkpoint(args.ckpt) if args.ckpt is not None else None  # no --ckpt: random weights
    device = resolve_device(None if args.device == "auto" else args.device)
    check_precision(PRECISION_OF_DTYPE[args.dtype], device, option="--dtype", full="fp32")
    engines = choose_engines(args, device)
    for size in args.sizes:
        geometry.check_size(size, size)
    if args.plot is not None and not args.sizes:
        raise UserError("--plot draws seconds per image against --sizes: give --sizes too, e.g. --sizes 256,384,512.")
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        raise UserError(f"--plot {args.plot}: its folder does not exist.")
    if any(e in DIFFUSERS_ENGINES or e == "sdcpp" for e in engines):
        for size in {args.H, args.W, *args.sizes}:
            check_diffusers_support(config, size, size)
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
        sizes=args.sizes,
        batches=args.batches,
    )
    return Plan(
        config=config,
        config_label=shown_path(config_path),
        ckpt=ckpt,
        settings=settings,
        engines=engines,
        command=shlex.join(["python", "scripts/benchmark.py", *argv]),
        plot=Path(args.plot) if args.plot is not None else None,
        memory=not args.skip_memory,
    )


def shown_path(path: Path) -> str:
    """A path relative to the project root when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
