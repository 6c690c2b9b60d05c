"""Which devices and precisions a generation can use here, checked before anything is loaded.

Each check raises ValueError naming the fix, in the words of the command line (``--device``, ``--compile``).
"""

from __future__ import annotations

import torch

from ldm.util import default_device

PRECISIONS = ("full", "autocast", "fp16", "bf16")


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """``device`` as a torch.device (None: CUDA, then MPS, then CPU); ValueError when it is unknown or absent here.

    ``option``: the command-line flag that the error messages name.
    """
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device '{device}' for {option}; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"device '{device}' is not available here ({count} CUDA GPU(s)); use {option} cpu.")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device 'mps' is not available here (no Apple GPU); use {option} cpu.")
    elif device.type != "cpu":
        raise ValueError(f"device '{device}' for {option} is not supported; use cpu, cuda, cuda:N or mps.")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError unless ``precision`` is one of PRECISIONS and runs on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU (the CPU has no fast float16); use full or bf16 on the CPU.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use fp16 or autocast.")


# Device types where the compile probe succeeded: the scripts check before loading and Pipeline again, and each
# probe costs seconds.
COMPILE_WORKS_ON: set[str] = set()


def check_compile(device: torch.device) -> None:
    """ValueError naming the fix unless ``torch.compile`` works on ``device`` here.

    Compiles a one-line function (seconds the first time): whether it works depends on the platform (a C++
    compiler for the CPU, Triton for CUDA, a supported Python), and it otherwise fails only at the first image.
    """
    if device.type in COMPILE_WORKS_ON:
        return
    try:
        torch.compile(_compile_probe)(torch.ones(2, device=device))
    except Exception as err:  # Dynamo and Inductor fail in many ways; any of them means compile is unusable here.
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        hint = ", or install a C++ compiler (g++ or clang)" if device.type == "cpu" else ""
        raise ValueError(f"torch.compile does not work on {device} here ({reason}); drop --compile{hint}.") from None
    COMPILE_WORKS_ON.add(device.type)


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1
