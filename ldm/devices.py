"""Which devices and precisions a generation can use here, checked before anything is loaded.

Each check raises ValueError naming the fix, in the words of the command line (``--device``, ``--compile``).
:func:`available_memory` says how much memory a device has free, :func:`is_out_of_memory` whether an error is an
allocation failure.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.util import default_device

PRECISIONS = ("full", "autocast", "fp16", "bf16")
CGROUP = Path("/sys/fs/cgroup")  # a container's own cgroup (v2), where its memory limit is
GIB = 2**30


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """``device`` as a torch.device (None: CUDA, then MPS, then CPU); ValueError when it is unknown or absent here.

    ``option``: the command-line flag that the error messages name.
    """
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}' for {option}; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise UserError(f"device '{device}' is not available here ({count} CUDA GPU(s)); use {option} cpu.")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device 'mps' is not available here (no Apple GPU); use {option} cpu.")
    elif device.type != "cpu":
        raise UserError(f"device '{device}' for {option} is not supported; use cpu, cuda, cuda:N or mps.")
    return device


def check_precision(precision: str, device: torch.device, option: str = "precision", full: str = "full") -> None:
    """ValueError unless ``precision`` is one of PRECISIONS and runs on ``device``.

    ``option`` and ``full``: how the messages name the setting and its float32 choice, for a command line that
    spells them otherwise (``scripts/benchmark.py --dtype fp32``).
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'.")
    if precision == "fp16" and device.type == "cpu":
        raise UserError(f"{option} fp16 needs a GPU (the CPU has no fast float16); use {full} or bf16 on the CPU.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU has no bfloat16 support; use {option} fp16 or {full}.")


def cpu_computes_bf16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (x86 with AVX-512, natively with AVX512-BF16 or AMX; Arm with
    BF16); elsewhere torch emulates bf16, about 100x slower than float32 (a 512x512 matmul on an AVX2 EPYC)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to tell, so no warning
        return True


def warn_about_slow_precision(precision: str, device: torch.device, engine: str) -> None:
    """Warn when ``precision`` works on ``device`` with ``engine``, but much slower than full precision would."""
    if precision == "bf16" and device.type == "cpu" and engine == "torch" and not cpu_computes_bf16():
        warnings.warn(
            "this CPU has no bfloat16 arithmetic for torch (it needs AVX-512, best with AVX512-BF16 or AMX), so bf16 "
            "is emulated, many times slower than float32: use precision full here.",
            stacklevel=3,
        )


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
        raise UserError(f"torch.compile does not work on {device} here ({reason}); drop --compile{hint}.") from None
    COMPILE_WORKS_ON.add(device.type)


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def available_memory(device: torch.device) -> int | None:
    """Bytes an allocation on ``device`` can get now; None where that cannot be told (MPS, CPUs off Linux)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but does not use are free to it, not to the driver.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        return _available_ram()
    return None


def _available_ram() -> int | None:
    """MemAvailable (free plus reclaimable cache), within the limit of a cgroup v2 container; None off Linux."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    lines = (line.split() for line in meminfo.splitlines())
    available = next((int(p[1]) * 1024 for p in lines if p and p[0] == "MemAvailable:"), None)
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text())
        stat = dict(line.split() for line in (CGROUP / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return available
    if limit == "max":
        return available
    # The cgroup counts page cache as used; its inactive part is reclaimed before the container is out of memory.
    room = int(limit) - used + int(stat.get("inactive_file", 0))
    return room if available is None else min(available, room)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the RuntimeError
    of torch's CPU and MPS allocators."""
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("DefaultCPUAllocator" in text or "MPS backend out of memory" in text)


def gib(size: int) -> str:
    """Bytes as GiB for messages: ``"107.4 GiB"``; sizes past a million GiB in powers of ten."""
    value = size / GIB
    return f"{value:.1f} GiB" if value < 1e6 else f"{value:.1e} GiB"
