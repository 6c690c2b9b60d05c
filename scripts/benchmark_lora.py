"""Seconds to apply, switch and remove a LoRA, on a model built from a config (random weights by default).

    python scripts/benchmark_lora.py                     # SD 1.5 architecture, fp32, rank 16: ~1 min on 2 CPU cores
    python scripts/benchmark_lora.py --dtype fp16 --switches 10
    python scripts/benchmark_lora.py --config configs/stable-diffusion/sdxl-base-inference.yaml --device cuda

Two seeded kohya-layout files (``lora_unet_*`` / ``lora_te*_``, every layer kohya trains, text encoders included)
are written to a temporary folder and read back with :func:`ldm.adapters.lora.read_lora`. The first apply also makes
the CPU copies of the weights it touches (see :mod:`ldm.adapters.lora`); each switch restores those and merges the
other file; remove restores them alone. The run ends by checking that the weights equal the base bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.adapters.lora import LoraFile, LoraMerger, read_lora
from ldm.adapters.lora_keys import Target
from ldm.adapters.lora_training import trained_targets
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, UserError, run_script
from ldm.util import instantiate_from_config, load_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/benchmark_lora.py", description="The cost of switching LoRAs.")
    add = parser.add_argument
    add("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml", help="the model's architecture")
    add("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's weights (default fp32)")
    add("--rank", type=int, default=16, help="the LoRAs' rank (default 16)")
    add("--switches", type=int, default=6, help="switches between the two LoRAs to time (default 6)")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def write_lora(path: Path, targets: dict[str, Target], rank: int, seed: int) -> LoraFile:
    """A seeded kohya LoRA of ``rank`` on every target (alpha = rank / 2), written to ``path`` and read back."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in targets.items():
        weight = getattr(target.module, target.param)
        rows = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.01
        up = torch.randn(rows, rank, *[1] * (weight.dim() - 2), generator=generator) * 0.01
        tensors |= {f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half()}
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, str(path))
    return read_lora(path)


def run(args: argparse.Namespace) -> None:
    if args.rank < 1 or args.switches < 1:
        raise UserError("--rank and --switches must be at least 1.")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with torch.no_grad():
        model = instantiate_from_config(load_config(args.config, args.overrides).model).eval()
        model.to(device, DTYPES[args.dtype])
        targets = trained_targets(model, text_encoder=True)
        if not targets:
            raise UserError(f"{args.config}: this model has no layers a LoRA trains (a UNet with cross-attention).")
        touched = sum(getattr(t.module, t.param).numel() for t in targets.values())
        print(f"{args.dtype} on {device}: {len(targets)} layers, {touched / 1e6:.1f} M weights touched")
        base = {name: t.module.get_parameter(t.param).detach().clone() for name, t in targets.items()}
        with tempfile.TemporaryDirectory() as folder:
            first, second = (write_lora(Path(folder) / f"{i}.safetensors", targets, args.rank, i) for i in (1, 2))
        merger = LoraMerger(model)

        def timed(entries: list[tuple[LoraFile, float, float]]) -> float:
            start = time.perf_counter()
            merger.apply(entries)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        applied = timed([(first, 1.0, 1.0)])
        switches = [timed([(second if i % 2 == 0 else first, 1.0, 0.8)]) for i in range(args.switches)]
        removed = timed([])
        exact = all(torch.equal(base[n], t.module.get_parameter(t.param)) for n, t in targets.items())
    print(
        f"first apply {applied:.2f} s; switch median {statistics.median(switches):.2f} s "
        f"({min(switches):.2f}-{max(switches):.2f}); remove {removed:.2f} s; weights back to the base bit for bit: "
        f"{exact}"
    )
    if not exact:
        raise RuntimeError("the weights after removing the LoRAs differ from the base: a bug in ldm.adapters.lora")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``argv``; returns the exit code (0, or 2 after a one-line error)."""
    return run_script(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
