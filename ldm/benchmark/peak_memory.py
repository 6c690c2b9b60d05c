"""Peak memory of the txt2img job, measured in a fresh Python process per engine, so that no other peak mixes in.

The process is ``python -m ldm.benchmark.peak_memory SPEC``, where SPEC is a JSON file naming the engine, the config,
the weights and the :class:`~ldm.benchmark.settings.Settings`; it prints its peaks as one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

import ldm
from ldm.benchmark.comparison import build_engine
from ldm.benchmark.settings import Settings
from ldm.util import load_config


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
    """The body of a memory process: load one engine, warm it up, run the txt2img job once, print its peaks as JSON
    ("process": loading and warm-up included; "txt2img": the job alone)."""
    spec = json.loads(Path(spec_path).read_text())
    settings = Settings(**spec["settings"])
    device = torch.device(settings.device)
    engine = build_engine(spec["engine"], load_config(spec["config"]), Path(spec["weights"]), settings)
    engine.txt2img(1)  # the warm-up the timings had: the OpenVINO engines convert or read their models here
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
        [sys.executable, "-m", "ldm.benchmark.peak_memory", str(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory process of {engine} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(memory_child(sys.argv[1]))
