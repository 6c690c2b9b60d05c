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
from ldm.devices import cpu_computes_bf16


def summary(values: dict[str, Any]) -> dict[str, Any]:
    """Per-engine medians (of lists) or values; ``ratios["a/b"]`` for every ordered pair of engines with values, and
    ``ratio`` (ldm/diffusers) when both are there."""
    out: dict[str, Any] = {name: statistics.median(v) if isinstance(v, list) else v for name, v in values.items()}
    measured = [name for name in values if out[name]]
    ratios = {f"{a}/{b}": out[a] / out[b] for a in measured for b in measured if a != b}
    if ratios:
        out["ratios"] = ratios
    if "ldm/diffusers" in ratios:
        out["ratio"] = ratios["ldm/diffusers"]
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
    elif device.type == "cpu":  # without them, bf16 results measure torch's emulation, and OpenVINO's bf16 is fp32
        info["cpu_computes_bf16"] = cpu_computes_bf16()
    if any("diffusers" in name for name in engines):
        import diffusers

        info["diffusers"] = diffusers.__version__
    if any("openvino" in name for name in engines):
        import openvino

        info["openvino"] = openvino.__version__
    return info


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _engines(results: dict[str, Any]) -> list[str]:
    return [name for name in ENGINES if name in results]


def _ratio_lines(label: str, values: dict[str, Any]) -> list[str]:
    """A matrix of ratios row/column for the engines with values: below 1, the row's engine is faster."""
    engines = [name for name in _engines(values) if values.get(name)]
    if len(engines) < 2:
        return []
    ratios = values["ratios"]
    lines = [f"{label} (row / column)".ljust(36) + "".join(f"{name:>20s}" for name in engines)]
    for a in engines:
        cells = "".join(f"{'':>20s}" if a == b else f"{ratios[f'{a}/{b}']:20.2f}" for b in engines)
        lines.append(f"  {a:34s}{cells}")
    return lines


def _growth_lines(growth: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    first = next(iter([*growth["size"].values(), *growth["batch"].values()]))
    engines = _engines(first.get("txt2img_s", first["unet_step_s"]))
    header = "".join(f"{name:>20s}" for name in engines)
    if growth["size"]:
        lines += ["", "cost growth with size: seconds per UNet step (batch 2) | per txt2img image", f"{'':16s}{header}"]
        for size, values in growth["size"].items():
            cells = "".join(
                f"{_seconds(values['unet_step_s'].get(n)):>10s} |{_seconds(values['txt2img_s'].get(n)):>8s}"
                for n in engines
            )  # fmt: skip
            lines.append(f"{size}x{size}".ljust(16) + cells)
    if growth["batch"]:
        lines += ["", "cost growth with batch: seconds per UNet step (CFG: batch 2 x images)", f"{'':16s}{header}"]
        for images, values in growth["batch"].items():
            cells = "".join(f"{_seconds(values['unet_step_s'].get(n)):>20s}" for n in engines)
            lines.append(f"{images} image(s)".ljust(16) + cells)
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: machine, command, table of medians, ratios between engines, checks, growth."""
    m, s, r = report["machine"], report["settings"], report["results"]
    engines = _engines(r["txt2img_s"])
    memory_kind = "CUDA allocated" if s["device"].startswith("cuda") else "RSS"
    rows = [
        ("UNet forward, batch 2", r["unet_forward_s"], _seconds),
        (f"txt2img, {s['steps']} DDIM steps", r["txt2img_s"], _seconds),
    ]
    if "peak_memory_bytes" in r:  # absent after --skip-memory
        rows += [
            (f"peak memory ({memory_kind}), whole process", r["peak_memory_bytes"], _bytes),
            (f"peak memory ({memory_kind}), txt2img", r["peak_memory_txt2img_bytes"], _bytes),
        ]
    pair = engines == ["ldm", "diffusers"]
    header = f"{'':36s}" + "".join(f"{name:>20s}" for name in engines) + ("   ldm/diffusers" if pair else "")
    versions = "".join(f", {name} {m[name]}" for name in ("diffusers", "openvino") if name in m)
    lines = [
        f"machine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads), torch {m['torch']}"
        + versions
        + f", device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + (", no bf16 arithmetic" if m.get("cpu_computes_bf16") is False else ""),
        f"command: {report['command']}",
        f"model:   {report['model']['config']}, weights {report['model']['weights']}",
        f"job:     {s['width']}x{s['height']}, {s['dtype']}, guidance {GUIDANCE_SCALE}; median of {s['repeats']} "
        "interleaved runs after a warm-up; "
        + ("memory from one run per engine in a fresh process" if "peak_memory_bytes" in r else "memory not measured"),
        "",
        header,
    ]
    for label, values, show in rows:
        cells = "".join(f"{show(values.get(name)):>20s}" for name in engines)
        lines.append(f"{label:36s}{cells}" + (f"{values['ratio']:16.2f}" if pair and "ratio" in values else ""))
    if not pair:
        ratio_rows = (("UNet forward", "unet_forward_s"), ("txt2img", "txt2img_s"), ("peak RSS", "peak_memory_bytes"))
        for label, key in ratio_rows:
            ratio_lines = _ratio_lines(label, r[key]) if key in r else []
            lines += ["", *ratio_lines] if ratio_lines else []
    checks = report["checks"]
    if checks:
        reference = checks["unet_reference"]
        unet = ", ".join(f"{name} {d:.2e}" for name, d in checks["unet_max_abs_diff_by_engine"].items())
        image = ", ".join(f"{name} {d:.2f}" for name, d in checks.get("image_mean_abs_diff_by_engine", {}).items())
        lines += [
            "",
            f"check: UNet max |{reference} - engine| (max |output| {checks['unet_max_abs_output']:.3g}): {unet}; "
            f"txt2img images differ from {reference}'s by (/255 on average): {image}",
        ]
    if "growth" in r:
        lines += _growth_lines(r["growth"])
    lines.append(f"total time: {report['elapsed_s']:.0f} s")
    return "\n".join(lines)
