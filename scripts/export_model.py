"""Turn a training run's checkpoint into a self-contained inference model: ``model.safetensors`` + ``config.yaml``.

    python scripts/export_model.py --config configs/latent-diffusion/shapes-ldm.yaml \\
        --ckpt logs/<run>/checkpoints/last.ckpt --out models/ldm/shapes --dtype fp16 --vocabulary shapes

The EMA weights replace the trained ones when the checkpoint has them (``--no-ema`` keeps the trained ones). The
config keeps only the ``model`` section, without the training-only links (the first stage's ``ckpt_path``), and with
``use_ema: false``, so it loads with any entry point: ``scripts/txt2img.py --config OUT/config.yaml --ckpt
OUT/model.safetensors``. ``--vocabulary`` lists the words the model was trained on (from a caption folder, a word
list or the shapes dataset), so that prompts with other words get a warning. Nothing existing is overwritten unless
``--force`` is given.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import (
    SCHEDULE_BUFFERS,
    ema_to_model_keys,
    load_model_from_config,
    read_checkpoint,
    save_checkpoint,
)
from ldm.errors import ScriptParser, UserError, print_error
from ldm.util import load_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def words(text: str) -> set[str]:
    """The words of a caption as the pipeline's vocabulary check splits them (lower-cased letters and digits)."""
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def vocabulary_of(source: str) -> list[str] | None:
    """The words a model was trained on, for a warning at generation about the others; None lists none.

    ``source``: ``none``; ``shapes`` (the words of ``ldm.data.shapes``' captions); a caption folder (the captions of
    ``ldm.data.folder.CaptionFolder``: ``metadata.jsonl`` or ``image.txt`` pairs); or a text file of words.
    """
    if source == "none":
        return None
    if source == "shapes":
        from ldm.data.shapes import CAPTION, COLORS, SHAPES

        template = CAPTION.replace("{color}", "").replace("{shape}", "").replace("{background}", "")
        return sorted({*COLORS, *SHAPES, *words(template)})
    path = Path(source)
    if path.is_dir():
        from ldm.data.folder import CaptionFolder

        vocabulary = set().union(*(words(caption) for _, caption in CaptionFolder(path).items))
    elif path.is_file():
        vocabulary = words(path.read_text(encoding="utf-8"))
    else:
        raise UserError(f"--vocabulary '{source}' is none of: none, shapes, a caption folder, a text file of words.")
    if not vocabulary:
        raise UserError(f"--vocabulary '{source}' holds no words; give captions or words, or --vocabulary none.")
    return sorted(vocabulary)


def export(config_path: Path, ckpt: Path, out: Path, dtype: str, use_ema: bool, vocabulary: str | None) -> None:
    config = load_config(config_path)
    model_config = OmegaConf.create({"model": OmegaConf.to_container(config.model, resolve=True)})
    params = model_config.model.params
    params.use_ema = False
    first_stage = params.get("first_stage_config")
    if first_stage is not None and "params" in first_stage:
        first_stage.params.pop("ckpt_path", None)
        first_stage.params.pop("ignore_keys", None)
    params.pop("ckpt_path", None)
    known = vocabulary_of(vocabulary) if vocabulary is not None else None
    if known is not None:
        model_config.vocabulary = known

    state_dict, _ = read_checkpoint(ckpt)
    if use_ema and any(k.startswith("model_ema.") for k in state_dict):
        state_dict = ema_to_model_keys(state_dict, [k for k in state_dict if k.startswith("model.")])
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("model_ema.", "first_stage_model.loss."))}
    # The schedule and the latent scale are not weights: rounding them to fp16 would change every sample.
    kept = SCHEDULE_BUFFERS | {"scale_factor"}
    state_dict = {
        k: v.to(DTYPES[dtype]) if v.is_floating_point() and k not in kept else v for k, v in state_dict.items()
    }

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state_dict, out / "model.safetensors")
    OmegaConf.save(model_config, out / "config.yaml")
    # Prove the export loads with the strict loader before calling it done.
    load_model_from_config(model_config, out / "model.safetensors", device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the training config of the run")
    parser.add_argument("--ckpt", type=Path, required=True, help="the run's checkpoint (e.g. last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.safetensors and config.yaml")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight precision to store")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights, not the EMA ones")
    parser.add_argument(
        "--vocabulary",
        default=None,
        help="list the words the model knows in its config, for a warning about others: shapes, a caption folder "
        "(its captions' words), a text file of words, or none (the default)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing export in --out")
    args = parser.parse_args(argv)
    try:
        existing = [p for p in (args.out / "model.safetensors", args.out / "config.yaml") if p.exists()]
        if existing and not args.force:
            raise UserError(f"{existing[0]} exists; pass --force to replace it.")
        export(args.config, args.ckpt, args.out, args.dtype, not args.no_ema, args.vocabulary)
    except (UserError, OSError) as err:
        return print_error(err)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"exported {args.out / 'model.safetensors'} and {args.out / 'config.yaml'} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
