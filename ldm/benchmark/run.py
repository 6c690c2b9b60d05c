"""One benchmark run: load the engines, cross-check them, time them turn by turn, measure their memory, and gather
everything into one JSON-ready report (see scripts/benchmark.py's docstring for the steps)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.benchmark.comparison import build_engine, check_tokenizers, check_unets
from ldm.benchmark.peak_memory import measure_memory
from ldm.benchmark.plot import plot_growth
from ldm.benchmark.report import machine_info, summary
from ldm.benchmark.settings import Plan, Settings
from ldm.benchmark.weights import write_weights
from ldm.geometry import LatentGeometry

UNET_TIMESTEP = 500


def _note(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def unet_inputs(
    config: DictConfig, settings: Settings, images: int = 1, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded float32 UNet inputs of one CFG step for ``images`` images (batch B = 2 * images): x (B, C, h, w),
    t (B,), context (B, L, D), on the device; ``size``: square images of that side instead of the settings' size."""
    geometry = LatentGeometry.from_config(config)
    unet_params = config.model.params.unet_config.params
    context_length = int((config.model.params.cond_stage_config.get("params") or {}).get("max_length", 77))
    generator = torch.Generator().manual_seed(settings.seed)
    height, width = (size, size) if size else (settings.height, settings.width)
    batch = 2 * images
    x = torch.randn(geometry.latent_shape(batch, height, width), generator=generator)
    context = torch.randn(batch, context_length, int(unet_params.context_dim), generator=generator)
    t = torch.full((batch,), UNET_TIMESTEP, dtype=torch.long)
    device = torch.device(settings.device)
    return x.to(device), t.to(device), context.to(device)


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


def _unet_calls(engines: dict[str, Any], inputs: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], Any]]:
    with_unet = {name: engine for name, engine in engines.items() if hasattr(engine, "unet")}
    return {name: functools.partial(engine.unet, *inputs) for name, engine in with_unet.items()}


def time_engines(plan: Plan, weights: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the engines, cross-check them, and time the UNet forward and txt2img of each, interleaved; then, with
    ``sizes`` / ``batches``, the UNet step and txt2img at each size and the UNet step at each batch.

    Returns ``({"unet": times, "txt2img": times, "growth": ...}, checks)`` with times per engine in seconds.
    """
    s = plan.settings
    device = torch.device(s.device)
    _note(f"loading {', '.join(plan.engines)}")
    engines = {name: build_engine(name, plan.config, weights, s) for name in plan.engines}
    inputs = unet_inputs(plan.config, s)
    checks: dict[str, Any] = {}
    if len(engines) > 1:
        check_tokenizers(engines)
    checks.update(check_unets(engines, inputs, s.dtype))  # which is also the UNets' warm-up (and conversion)

    _note(f"timing the UNet forward ({s.repeats} runs each)")
    unet_times, _ = interleaved(_unet_calls(engines, inputs), s.repeats, device)

    _note(f"timing txt2img ({s.steps} steps, {s.repeats} runs each, after a 1-step warm-up)")
    interleaved({name: functools.partial(engine.txt2img, 1) for name, engine in engines.items()}, 1, device)
    txt2img_calls = {name: functools.partial(engine.txt2img, s.steps) for name, engine in engines.items()}
    txt2img_times, images = interleaved(txt2img_calls, s.repeats, device)
    reference = next(iter(images))
    for name in list(images)[1:]:
        difference = np.abs(images[reference].astype(np.float64) - images[name].astype(np.float64)).mean()
        checks.setdefault("image_mean_abs_diff_by_engine", {})[name] = float(difference)
    if "diffusers" in images and reference == "ldm":
        checks["image_mean_abs_diff"] = checks["image_mean_abs_diff_by_engine"]["diffusers"]
    times = {"unet": unet_times, "txt2img": txt2img_times}
    if s.sizes or s.batches:
        times["growth"] = time_growth(plan, engines, device)
    return times, checks


def time_growth(plan: Plan, engines: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Seconds of the UNet step (one CFG step) and of txt2img per square size, and of the UNet step per number of
    images, per engine: medians of ``repeats`` interleaved runs after a warm-up (which converts the OpenVINO
    engines' models for the shape)."""
    s = plan.settings
    growth: dict[str, Any] = {"size": {}, "batch": {}}
    for size in s.sizes:
        _note(f"cost growth: {size}x{size}")
        calls = _unet_calls(engines, unet_inputs(plan.config, s, size=size))
        interleaved(calls, 1, device)
        step, _ = interleaved(calls, s.repeats, device)
        image_calls = {name: functools.partial(engine.txt2img, s.steps, size) for name, engine in engines.items()}
        interleaved({name: functools.partial(e.txt2img, 1, size) for name, e in engines.items()}, 1, device)
        image, _ = interleaved(image_calls, s.repeats, device)
        growth["size"][size] = {"unet_step_s": summary(step), "txt2img_s": summary(image)}
    for images in s.batches:
        _note(f"cost growth: {images} images a step")
        calls = _unet_calls(engines, unet_inputs(plan.config, s, images=images))
        interleaved(calls, 1, device)
        step, _ = interleaved(calls, s.repeats, device)
        growth["batch"][images] = {"unet_step_s": summary(step)}
    return growth


def _note_medians(times: dict[str, Any]) -> None:
    for label, key in (("UNet forward", "unet"), ("txt2img", "txt2img")):
        medians = summary(times[key])
        _note(f"{label} medians: " + ", ".join(f"{name} {medians[name]:.3f} s" for name in times[key]))


def run_benchmark(plan: Plan) -> dict[str, Any]:
    """Everything scripts/benchmark.py's docstring lists, as a JSON-ready dict."""
    started = time.perf_counter()
    s = plan.settings
    with tempfile.TemporaryDirectory(prefix="ldm-benchmark-") as tmp:
        if plan.ckpt is None:
            _note(f"making seeded random weights for {plan.config_label}")
        weights = write_weights(plan, Path(tmp))
        config_file = Path(tmp) / "config.yaml"
        OmegaConf.save(plan.config, config_file)
        times, checks = time_engines(plan, weights)
        _note_medians(times)  # before the memory processes, which take as long again: a stopped run keeps these
        if plan.plot is not None and "growth" in times:
            plot_growth(times["growth"], plan.plot, f"{plan.config_label}, {s.steps} DDIM steps, {s.dtype}")
        gc.collect()  # the engines are gone; the memory processes should not compete with them for RAM
        memory = {}
        for name in plan.engines if plan.memory else ():
            _note(f"measuring the peak memory of {name} in a fresh process")
            memory[name] = measure_memory(name, config_file, weights, s)
    memory_results = {
        "peak_memory_bytes": summary({name: m["process"] for name, m in memory.items()}),
        "peak_memory_txt2img_bytes": summary({name: m["txt2img"] for name, m in memory.items()}),
    } if plan.memory else {}  # fmt: skip
    return {
        "command": plan.command,
        "machine": machine_info(torch.device(s.device), plan.engines),
        "model": {"config": plan.config_label, "weights": str(plan.ckpt) if plan.ckpt else f"random (seed {s.seed})"},
        "settings": dataclasses.asdict(s),
        "checks": checks,
        "results": {
            "unet_forward_s": summary(times["unet"]),
            "txt2img_s": summary(times["txt2img"]),
            **memory_results,
            **({"growth": times["growth"]} if "growth" in times else {}),
        },
        "elapsed_s": time.perf_counter() - started,
    }
