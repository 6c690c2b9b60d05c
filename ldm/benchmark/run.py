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
