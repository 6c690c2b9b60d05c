"""``python scripts/serve.py``: serve a model over A1111's HTTP API and a web page (see :mod:`ldm.server`).

    python scripts/serve.py --config models/ldm/shapes/config.yaml --ckpt models/ldm/shapes/model.safetensors
    python scripts/serve.py --ckpt model.safetensors --ckpt_dir models/ --listen --api-auth me:secret

Flags follow the sampling scripts (``--config``, ``--ckpt``, ``--device``, ``--precision``, trailing ``key=value``
config overrides) and A1111's server flags (``--listen``, ``--port``, ``--api-auth``, ``--cors-allow-origins``,
``--ckpt-dir``, ``--lora-dir``, ``--embeddings-dir``; underscores work as well). Everything is checked before the
model loads; bad input ends with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.adapters.embeddings import embeddings_folder
from ldm.cli import find_checkpoint, parse_slice_size, shown_path
from ldm.devices import PRECISIONS
from ldm.errors import ScriptParser, UserError, run_script
from ldm.openvino_engine import add_engine_argument
from ldm.request import RuntimeOptions
from ldm.server.app import Guard, create_app
from ldm.server.catalog import Catalog, Checkpoint
from ldm.server.jobs import JobQueue
from ldm.server.service import Service

DEFAULT_PORT = 7860  # A1111's


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/serve.py", description="Serve a model over A1111's API and a web page.")
    add = parser.add_argument
    add("--config", type=str, default=None, help="config of the model (default: detected from the checkpoint)")
    add("--ckpt", type=str, default=None, help="the checkpoint to serve first (default: the scripts' default path)")
    add("--ckpt-dir", "--ckpt_dir", dest="ckpt_dir", action="append", default=[], metavar="DIR",
        help="a folder of further checkpoints clients may switch to by name (repeatable)")  # fmt: skip
    add("--lora-dir", "--lora_dir", dest="lora_dir", default=None, help="the LoRAs prompts may name (<lora:name:w>)")
    add("--embeddings-dir", "--embeddings_dir", dest="embeddings_dir", default=None,
        help="textual-inversion embeddings (default: embeddings/ where it exists)")  # fmt: skip
    add("--outdir", type=str, default="outputs/server", help="where images go when a request sets save_images")
    add("--listen", action="store_true", help="listen on every network interface (default: loopback only)")
    add("--host", type=str, default=None, help="the address to listen on (overrides --listen)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"the port (default {DEFAULT_PORT}; 0: any free one)")
    add("--api-auth", "--api_auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
        help="require HTTP basic auth with these credentials (A1111's flag)")  # fmt: skip
    add("--api-token", "--api_token", dest="api_token", action="append", default=[], metavar="TOKEN",
        help="also accept 'Authorization: Bearer TOKEN' (repeatable)")  # fmt: skip
    add("--cors-allow-origins", "--cors_allow_origins", dest="cors", default=None, metavar="ORIGIN[,ORIGIN]",
        help="let browser pages from these origins call the API (default: none, CORS off)")  # fmt: skip
    add("--max_queue", type=int, default=8, help="jobs that may wait; more are answered 429 (default 8)")
    add(
        "--max_batch",
        type=int,
        default=4,
        help="txt2img requests that differ only in prompt and seed run together up to this many images (default 4)",
    )
    add("--max_images", type=int, default=16, help="images per request at most (batch_size x n_iter, default 16)")
    add("--max_body_mb", type=int, default=64, help="the largest request body in MiB (default 64)")
    add("--precision", choices=PRECISIONS, default="autocast", help="as the sampling scripts' --precision")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    add("--attention_slicing", type=str, nargs="?", const="auto", default=None, metavar="N|auto",
        help="compute attention in slices (saves memory)")  # fmt: skip
    add("--vae_tiling", action="store_true", help="decode large images by tiles")
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _credentials(text: str | None) -> list[tuple[str, str]]:
    if text is None:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth takes USER:PASS pairs separated by commas, got {item!r}.")
        pairs.append((user, password))
    return pairs


def _folder(path: str | None, flag: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_dir():
        raise UserError(f"{flag} '{path}' is not a folder.")
    return Path(path)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); UserError when the port is taken or the address is not this host's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); give another --port.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    for flag, value in (("--max_queue", args.max_queue), ("--max_images", args.max_images),
                        ("--max_batch", args.max_batch), ("--max_body_mb", args.max_body_mb)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}.")
    guard = Guard(
        users=_credentials(args.api_auth), tokens=tuple(args.api_token), max_body=args.max_body_mb << 20,
        cors_origins=tuple(o.strip() for o in args.cors.split(",") if o.strip()) if args.cors else (),
    )  # fmt: skip
    ckpt = find_checkpoint(args.ckpt)
    config = Path(args.config) if args.config else None
    if config is not None and not config.is_file():
        raise UserError(f"--config '{args.config}' does not exist.")
    runtime = RuntimeOptions(
        device=args.device, precision=args.precision, attention_slicing=parse_slice_size(args.attention_slicing),
        vae_tiling=args.vae_tiling, engine=args.engine,
    )  # fmt: skip
    folders = [_folder(d, "--ckpt-dir") for d in args.ckpt_dir]
    first = Checkpoint(ckpt, shown_path(ckpt), config, tuple(args.overrides))
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    sock = bind(host, args.port)
    service = Service(
        Catalog(folders, [first]), first, runtime, lora_dir=_folder(args.lora_dir, "--lora-dir"),
        embeddings_dir=embeddings_folder(args.embeddings_dir), outdir=Path(args.outdir), max_images=args.max_images,
    )  # fmt: skip
    queue = JobQueue(args.max_queue, max_batch=args.max_batch, run_batch=service.run_batch)
    app = create_app(service, queue, guard)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {service.options['sd_model_checkpoint']} on http://{shown}:{port} (page /, API /sdapi/v1, "
          "docs /docs)", flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        queue.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(build_parser(), serve, argv)


if __name__ == "__main__":
    sys.exit(main())
