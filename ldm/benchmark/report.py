"""The benchmark's results as numbers (medians, ratios, the machine) and as the table the script prints."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.benchmark.settings import ENGINES, GUIDANCE_SCALE


def summary(values: dict[str, Any]) -> dict[str, Any]:
    """Per-engine medians (of lists) or values, plus the ratio ldm/diffusers when both are there."""
    out = {name: statistics.median(v) if isinstance(v, list) else v for name, v in values.items()}
    if out.get("ldm") is not None and out.get("diffusers"):
        out["ratio"] = out["ldm"] / out["diffusers"]
    if any(isinstance(v, list) for v in values.values()):
        out["runs"] = values
    return out


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
