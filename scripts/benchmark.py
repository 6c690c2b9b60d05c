"""Seconds and peak memory of this project's txt2img next to diffusers', on the same weights and the same machine.

    python scripts/benchmark.py       # SD 1.5 architecture, random weights, 256x256, fp32: ~2.7 min on 2 CPU cores
    python scripts/benchmark.py --dtype bf16 --json bench.json
    python scripts/benchmark.py --engines ldm,ldm-openvino,diffusers,openvino-diffusers,sdcpp --dtype bf16 \
        --sizes 256,384,512 --batches 1,2,4 --plot seconds-per-image.png
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
   weights; "txt2img" counts from after loading (Linux and CUDA only). ``--skip-memory`` leaves this step out.

Ratios are this project over diffusers: below 1 means this project is faster or smaller.

Engines (``--engines``, comma-separated; default ``ldm,diffusers``): ``ldm`` (this project on torch),
``ldm-openvino`` (this project with ``--engine openvino``, :mod:`ldm.openvino_engine`; ``pip install -r
requirements-openvino.txt``), ``diffusers``, ``openvino-diffusers`` (OpenVINO running diffusers' own UNet, VAE
decoder and text encoder, converted directly from diffusers' modules, as optimum-intel does) and ``sdcpp``
(stable-diffusion.cpp through ``stable-diffusion-cpp-python``, on the same ``.safetensors`` file; left out with a
note where it is not installed; Euler steps, its time and memory only). Every UNet is checked against the first
engine's, and the report gives the ratio of every pair (row / column). The OpenVINO engines convert a model per
input shape on its first call, which the warm-ups make; ``ldm-openvino``'s memory process reads the disk cache the
timing process filled, ``openvino-diffusers``' converts again (counted in "whole process", not in "txt2img").

Cost growth: ``--sizes 256,384,512`` also times every engine's UNet step (batch 2) and txt2img at each square size,
``--batches 1,2,4`` the UNet step at that many images (CFG doubles the batch); ``--plot PATH`` draws seconds per
image against the sizes as a PNG.

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

The code is in ``ldm/benchmark/`` (one module per step; see its ``__init__``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.benchmark.comparison import EnginesDiffer
from ldm.benchmark.report import format_report
from ldm.benchmark.run import run_benchmark
from ldm.benchmark.settings import build_parser, plan
from ldm.cli import BAD_INPUT
from ldm.errors import print_error
from ldm.to_diffusers import ConversionError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``argv``; returns the exit code (0, 2 after bad input, 1 when the engines differ)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    try:
        report = run_benchmark(plan(args, argv))
    except BAD_INPUT as err:
        return print_error(err)
    except (EnginesDiffer, ConversionError) as err:
        return print_error(err, code=1)
    print(format_report(report))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
