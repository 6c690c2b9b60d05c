"""Requests per second and latency of the HTTP server under N concurrent clients, on the bundled demo model.

    python scripts/benchmark_server.py                        # 1, 4 and 16 clients, 30 s each: ~2 min
    python scripts/benchmark_server.py --clients 1 8 --seconds 10 --steps 10 --json out.json

The server (``scripts/serve.py``) runs in its own process on a free loopback port, with ``--max_queue`` (default 16,
so that 16 clients all wait in the queue rather than being refused); each client posts txt2img back to back (see
:mod:`ldm.benchmark.server_load`). One warm-up request runs first. Give ``--config`` / ``--ckpt`` for another model;
every further flag after ``--`` goes to the server.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.benchmark.server_load import ServerProcess, format_results, run_load, summary
from ldm.errors import ScriptParser, UserError, run_script

DEMO = Path(__file__).resolve().parents[1] / "models/ldm/shapes"


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/benchmark_server.py", description="Load test of scripts/serve.py.")
    add = parser.add_argument
    add("--config", default=str(DEMO / "config.yaml"), help="the model's config (default: the demo model's)")
    add("--ckpt", default=str(DEMO / "model.safetensors"), help="the checkpoint (default: the demo model)")
    add("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients, one run each")
    add("--seconds", type=float, default=30.0, help="length of each run (default 30)")
    add("--steps", type=int, default=20, help="sampler steps per request (default 20)")
    add("--size", type=int, default=64, help="image width and height (default 64, the demo model's)")
    add("--sampler", default="Euler a", help="sampler (default Euler a)")
    add("--max_queue", type=int, default=16, help="the server's --max_queue (default 16)")
    add("--json", type=str, default=None, help="also write the results to this JSON file")
    add("server_args", nargs="*", help="further flags for scripts/serve.py (after --)")
    return parser


def benchmark(args: argparse.Namespace) -> None:
    if any(c < 1 for c in args.clients) or args.seconds <= 0:
        raise UserError("--clients must be at least 1 and --seconds above 0.")
    body = {"prompt": "a red circle on a blue background", "steps": args.steps, "sampler_name": args.sampler,
            "width": args.size, "height": args.size, "seed": -1}  # fmt: skip
    flags = ["--config", args.config, "--ckpt", args.ckpt, "--max_queue", str(args.max_queue), *args.server_args]
    with ServerProcess(*flags) as server:
        warm = server.post("/sdapi/v1/txt2img", json=body)
        if warm.status_code != 200:
            raise UserError(f"the warm-up request failed: {warm.status_code} {warm.text[:300]}")
        results = []
        for clients in args.clients:
            results.append(run_load(server, clients, args.seconds, body))
            print(format_results(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.steps} steps, {args.sampler}, {args.size}x{args.size}, {args.seconds:g} s per run:\n")
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(summary(results), indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
