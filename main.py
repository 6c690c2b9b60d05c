"""Train (and test) a model from configs, with CompVis's main.py flags, on PyTorch Lightning 2.x.

    python main.py --base configs/latent-diffusion/shapes-tiny.yaml -t lightning.trainer.max_steps=100
    python main.py -r logs/2024-05-01T12-00-00_shapes-tiny -t           # go on from its last.ckpt
    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --devices 0,1 --precision bf16-mixed

Configs merge left to right, then trailing ``key.sub=value`` overrides apply (``ldm.util.load_config``). The
``lightning`` section configures the run: ``trainer`` (Trainer arguments; the Trainer flags below override them),
``callbacks`` (``image_logger``, ``learning_rate_logger`` and any other named ``target``/``params`` nodes),
``modelcheckpoint`` (``ModelCheckpoint`` arguments, e.g. ``every_n_train_steps``) and ``logger`` (``csv``,
``tensorboard`` or a ``target``/``params`` node). Everything else is the project config: ``model`` (with
``base_learning_rate``) and ``data``.

A run writes ``<logdir>/<timestamp>_<name>/``: ``configs/`` (the merged configs), ``checkpoints/`` (``last.ckpt``
and the periodic ones), ``images/train|val/`` (``ImageLogger``) and ``csv/`` or ``tensorboard/`` (the logger).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.callbacks import AtomicCheckpointIO, DiskFullError, ImageLogger, LastCheckpoint, SetupCallback, TrainingRng
from ldm.checkpoint import CheckpointError
from ldm.data.base import DataModuleFromConfig, WrappedDataset
from ldm.data.class_images import GenerateClassImages
from ldm.data.latent_cache import CacheLatents
from ldm.errors import ScriptParser, UserError, print_error
from ldm.resume import adopt_callback_states, check_resumable, find_resume_checkpoint, read_resume_checkpoint
from ldm.util import ConfigError, instantiate_from_config, load_config

# CompVis configs name ``main.ImageLogger`` and ``main.DataModuleFromConfig``; they resolve to the ldm classes.
__all__ = [
    "DataModuleFromConfig",
    "ImageLogger",
    "SetupCallback",
    "WrappedDataset",
    "find_resume_checkpoint",
    "get_parser",
    "main",
]

# Lightning's DDP launcher starts the other ranks by running this script again; they read the logdir rank 0 chose
# from here, since their own clock may already show the next second.
LOGDIR_ENV = "LDM_MAIN_LOGDIR"

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")
BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr")
TRAINER_FLAGS = (
    "accelerator",
    "devices",
    "num_nodes",
    "strategy",
    "precision",
    "max_steps",
    "max_epochs",
    "accumulate_grad_batches",
)
LOGGERS = {"csv": "pytorch_lightning.loggers.CSVLogger", "tensorboard": "pytorch_lightning.loggers.TensorBoardLogger"}


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{value}'")


def parse_devices(value: str) -> int | str | list[int]:
    """``--devices`` / ``--gpus``: ``auto``, a count (``2``, ``-1`` = all) or indices (``0,1``; ``0,`` = GPU 0)."""
    if value == "auto":
        return value
    try:
        if "," in value:
            return [int(part) for part in value.split(",") if part.strip()]
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', a count or indices such as 0,1; got '{value}'") from None


def parse_precision(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def get_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(
        prog="main.py",
        description="Train (-t) and test models from configs, as CompVis's main.py.",
        epilog="Trailing key.sub=value arguments override the configs, e.g. lightning.trainer.max_steps=100.",
    )
    parser.add_argument(
        "-n", "--name", default="", help="name of the run, after the logdir's timestamp (default: the first config's)"
    )
    parser.add_argument("-r", "--resume", default="", help="resume from a logdir, or from a checkpoint inside one")
    parser.add_argument(
        "-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
        help="configs, merged left to right; trailing key.sub=value arguments override them",
    )  # fmt: skip
    parser.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False, help="train")
    parser.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False, help="disable test")
    parser.add_argument(
        "-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
        help="tracebacks instead of one-line errors, and post-mortem debugging (pdb) when training fails",
    )  # fmt: skip
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything (default 23)")
    parser.add_argument("-f", "--postfix", default="", help="appended to the logdir's name")
    parser.add_argument("-l", "--logdir", default="logs", help="directory for logging data")
    parser.add_argument(
        "--scale_lr", type=str2bool, nargs="?", const=True, default=True,
        help="learning rate = accumulate_grad_batches x devices x nodes x batch size x base_learning_rate (default)",
    )  # fmt: skip
    trainer = parser.add_argument_group("Trainer flags (override lightning.trainer)")
    trainer.add_argument("--gpus", type=parse_devices, help="GPUs to use: a count, or indices such as 0,1")
    trainer.add_argument("--accelerator", help="cpu, gpu, mps, auto (default: auto)")
    trainer.add_argument("--devices", type=parse_devices, help="device count or indices (default: auto)")
    trainer.add_argument("--num_nodes", type=int, help="number of machines")
    trainer.add_argument("--strategy", help="auto (ddp on several devices), ddp, fsdp, deepspeed_stage_2 ...")
    trainer.add_argument("--precision", type=parse_precision, help="32, 16-mixed, bf16-mixed ...")
    trainer.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    trainer.add_argument("--max_epochs", type=int, help="stop after this many epochs")
    trainer.add_argument("--accumulate_grad_batches", type=int, help="batches per optimizer step")
    return parser


def _explicit_bools(argv: Sequence[str]) -> list[str]:
    """``-t key=value`` means train plus an override; argparse would read ``key=value`` as -t's optional value."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in BOOL_FLAGS and following is not None and following.lower() not in TRUE_WORDS + FALSE_WORDS:
            out.append("true")
    return out


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(options, overrides)``; usage errors exit with code 2 and one line on stderr."""
    parser = get_parser()
    opt, unknown = parser.parse_known_args(_explicit_bools(argv))
    flags = [arg for arg in unknown if arg.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    # ``-b a.yaml key=value`` puts the override among the configs.
    overrides = [b for b in opt.base if "=" in b and not Path(b).exists()] + unknown
    opt.base = [b for b in opt.base if b not in overrides]
    if opt.name and opt.resume:
        parser.error("-n/--name and -r/--resume cannot both be given: a resumed run keeps its logdir")
    for flag, value in (("-n/--name", opt.name), ("-f/--postfix", opt.postfix)):
        if not is_plain_name(value):
            parser.error(f"{flag} must be a name, not a path: got {value!r} (-l/--logdir chooses the folder)")
    if not opt.base and not opt.resume:
        parser.error("give the configs with -b/--base, or a logdir to resume with -r/--resume")
    return opt, overrides


def is_plain_name(value: str) -> bool:
    """Whether ``value`` can only be part of one path component: the logdir's name, inside ``-l``, is made of it."""
    return not any(separator and separator in value for separator in (os.sep, os.altsep, "\0"))


def info(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def check_checkpoint_paths(node: Any, path: str) -> None:
    """Fail before any model is built when a ``ckpt_path`` in the config names no file (building SD takes a while)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}"
            if key == "ckpt_path" and isinstance(value, str) and not Path(value).is_file():
                raise ConfigError(f"{where}: checkpoint '{value}' does not exist.")
            check_checkpoint_paths(value, where)


def trainer_settings(config: Mapping[str, Any], opt: argparse.Namespace) -> dict[str, Any]:
    """The Trainer arguments: ``lightning.trainer`` with the command line's Trainer flags on top."""
    settings = dict(config)
    if str(settings.get("accelerator", "")).startswith("ddp"):
        # Lightning 1.x took the strategy as ``accelerator``: CompVis's main.py saves ``accelerator: ddp``.
        settings.setdefault("strategy", settings.pop("accelerator"))
    if "resume_from_checkpoint" in settings:
        # Lightning 1.x's way to resume, which CompVis's main.py saves into a resumed run's lightning.yaml.
        legacy = settings.pop("resume_from_checkpoint")
        if not opt.resume:
            raise ConfigError(
                f"lightning.trainer.resume_from_checkpoint: Lightning 2 has no such setting; resume with "
                f"main.py -r {legacy or '<logdir>'} -t instead."
            )
    gpus = settings.pop("gpus", None) if opt.gpus is None else opt.gpus
    if gpus is not None:
        # Lightning 1.x's ``gpus`` (still in CompVis commands) is ``accelerator=gpu`` with those devices.
        settings.update(accelerator="gpu", devices=parse_devices(str(gpus)) if isinstance(gpus, str) else gpus)
    for name in TRAINER_FLAGS:
        value = getattr(opt, name)
        if value is not None:
            settings[name] = value
    accepted = [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]
    for name in settings:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"lightning.trainer.{name}: Trainer has no parameter '{name}'.{hint}")
    return settings


def make_logger(config: Any, logdir: Path) -> Any:
    """``lightning.logger``: ``csv`` (default), ``tensorboard``, or a ``target``/``params`` node."""
    if config is None or isinstance(config, str):
        name = config or "csv"
        if name not in LOGGERS:
            raise ConfigError(f"lightning.logger: '{name}' is not one of {sorted(LOGGERS)} (or a target/params node).")
        config = OmegaConf.create({"target": LOGGERS[name]})
    target = str(config.get("target", ""))
    short = target.rsplit(".", 1)[-1].removesuffix("Logger").lower() or "logs"
    node = OmegaConf.merge({"params": {"save_dir": str(logdir), "name": short}}, config)
    try:
        return instantiate_from_config(node, path="lightning.logger")
    except ImportError as err:
        raise ConfigError(f"lightning.logger: {err}") from err


def make_callbacks(lightning_config: DictConfig, setup: SetupCallback, ckptdir: Path) -> list[pl.Callback]:
    """The run's callbacks: set-up, the random generators' states, ``last.ckpt`` keeping, ``ModelCheckpoint``,
    latent caching and the ``lightning.callbacks``."""
    checkpoint_defaults = {
        "target": "ldm.callbacks.PeriodicCheckpoint",
        "params": {
            "dirpath": str(ckptdir),
            "filename": "{epoch:06}-{step:09}",
            "verbose": True,
            "save_last": True,
            # One name per file: a resumed run overwrites last.ckpt instead of adding last-v1.ckpt.
            "enable_version_counter": False,
        },
    }
    checkpoint_config = OmegaConf.merge(checkpoint_defaults, lightning_config.get("modelcheckpoint") or {})
    if "monitor" in checkpoint_config.params and "save_top_k" not in checkpoint_config.params:
        checkpoint_config.params.save_top_k = 3
    callback_defaults = {
        "image_logger": {
            "target": "ldm.callbacks.ImageLogger",
            "params": {"batch_frequency": 750, "max_images": 4, "clamp": True},
        },
        "learning_rate_logger": {
            "target": "pytorch_lightning.callbacks.LearningRateMonitor",
            "params": {"logging_interval": "step"},
        },
    }
    callback_configs = OmegaConf.merge(callback_defaults, lightning_config.get("callbacks") or {})
    callbacks = [setup, TrainingRng(), instantiate_from_config(checkpoint_config, path="lightning.modelcheckpoint")]
    callbacks.append(GenerateClassImages(setup.config))  # prior preservation's missing class images, from the model
    callbacks.append(CacheLatents())  # encodes the images of datasets with cache_latents before the first batch
    callbacks.append(LastCheckpoint(ckptdir / "last.ckpt"))
    for name, node in callback_configs.items():
        callbacks.append(instantiate_from_config(node, path=f"lightning.callbacks.{name}"))
    return callbacks


@dataclass
class Run:
    """Everything ``main`` built before training: the run goes ahead only if all of it could be made."""

    trainer: pl.Trainer
    model: pl.LightningModule
    data: pl.LightningDataModule
    logdir: Path
    ckpt: Path | None


def build(opt: argparse.Namespace, overrides: Sequence[str], now: str) -> Run:
    """Resolve the logdir, merge the configs and build the model, data and Trainer; ConfigError on bad input."""
    ckpt = None
    configs = list(opt.base)
    if opt.resume:
        logdir, ckpt = find_resume_checkpoint(Path(opt.resume))
        saved = sorted(str(p) for p in (logdir / "configs").glob("*.yaml"))
        if not saved:
            raise ConfigError(f"cannot resume from '{logdir}': it has no saved configs in {logdir / 'configs'}.")
        configs = saved + configs
    else:
        name = opt.name or Path(opt.base[0]).stem
        logdir = Path(opt.logdir) / f"{now}_{name}{opt.postfix}"
    logdir = Path(os.environ.get(LOGDIR_ENV, logdir))
    ckptdir, cfgdir = logdir / "checkpoints", logdir / "configs"

    config = load_config(configs, overrides)
    lightning_config = config.pop("lightning", None) or OmegaConf.create()
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(
                f"the config has no '{section}' section; main.py needs model (target, params, base_learning_rate) "
                "and data (target: ldm.data.base.DataModuleFromConfig, params: batch_size, train, ...)."
            )
    lightning_config.trainer = trainer_settings(lightning_config.get("trainer") or {}, opt)
    check_checkpoint_paths(config.model, "model")

    pl.seed_everything(opt.seed, workers=True)
    model = instantiate_from_config(config.model, path="model")
    resumed = None
    if ckpt is not None:
        # Here rather than in trainer.fit: a checkpoint that cannot be resumed must fail before the logdir is touched.
        resumed = read_resume_checkpoint(ckpt)
        check_resumable(resumed, model, ckpt, training=opt.train)
    data = instantiate_from_config(config.data, path="data")
    if isinstance(data, DataModuleFromConfig):
        if opt.train and "train" not in data.dataset_configs:
            raise ConfigError("data.params.train: training (-t) needs a train dataset.")
        data.setup()
    if not opt.train and (opt.no_test or not has_test(model, data)):
        raise ConfigError("nothing to do: pass -t to train (testing needs data.params.test and a model test_step).")

    settings = OmegaConf.to_container(lightning_config.trainer, resolve=True)  # plain lists: Lightning checks types
    if isinstance(settings.get("strategy"), Mapping):
        settings["strategy"] = instantiate_from_config(settings["strategy"], path="lightning.trainer.strategy")
    if "plugins" not in settings and "deepspeed" not in str(settings.get("strategy", "")):
        # DeepSpeed writes its own sharded checkpoint folders; everything else saves through this plugin.
        settings["plugins"] = [AtomicCheckpointIO(preloaded=(ckpt, resumed) if resumed is not None else None)]
    setup = SetupCallback(now, logdir, ckptdir, cfgdir, config, lightning_config)
    logger = make_logger(lightning_config.get("logger"), logdir)
    callbacks = make_callbacks(lightning_config, setup, ckptdir)
    if resumed is not None:
        adopt_callback_states(resumed, callbacks)
    try:
        trainer = pl.Trainer(**settings, default_root_dir=str(logdir), logger=logger, callbacks=callbacks)
        implicit_ddp = "strategy" not in settings and isinstance(trainer.strategy, DDPStrategy)
        if implicit_ddp and not model.automatic_optimization:
            # GAN-style models (AutoencoderKL) step two optimizers on one forward pass, so each backward leaves the
            # other optimizer's parameters without gradients, which DDP must be told to expect.
            settings["strategy"] = "ddp_find_unused_parameters_true"
            trainer = pl.Trainer(**settings, default_root_dir=str(logdir), logger=logger, callbacks=callbacks)
    except (MisconfigurationException, ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"lightning.trainer: {err}") from err

    if opt.train:
        set_learning_rate(model, config, data, trainer, opt.scale_lr)
    return Run(trainer, model, data, logdir, ckpt)


def has_test(model: pl.LightningModule, data: pl.LightningDataModule) -> bool:
    """Whether there is something to test: a test split in the data and a ``test_step`` in the model."""
    has_test_data = "test" in data.dataset_configs if isinstance(data, DataModuleFromConfig) else True
    return has_test_data and type(model).test_step is not pl.LightningModule.test_step


def set_learning_rate(
    model: pl.LightningModule, config: DictConfig, data: Any, trainer: pl.Trainer, scale_lr: bool
) -> None:
    """``model.learning_rate``: ``base_learning_rate``, times the effective batch size with ``--scale_lr``."""
    base_lr = config.model.get("base_learning_rate")
    if base_lr is None:
        raise ConfigError("model.base_learning_rate is not set; training needs it (e.g. 1.0e-04).")
    if not scale_lr:
        model.learning_rate = base_lr
        info(f"Setting learning rate to {base_lr:.2e}")
        return
    batch_size = getattr(data, "batch_size", None)
    if batch_size is None:
        raise ConfigError("--scale_lr needs the data's batch_size (data.params.batch_size); or pass --scale_lr false.")
    accumulate, devices, nodes = trainer.accumulate_grad_batches, trainer.num_devices, trainer.num_nodes
    model.learning_rate = accumulate * devices * nodes * batch_size * base_lr
    info(
        f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) * "
        f"{devices} (devices) * {nodes} (num_nodes) * {batch_size} (batch_size) * {base_lr:.2e} (base_learning_rate)"
    )


def disk_full(err: DiskFullError, logdir: Path) -> str:
    """The one-line report of a checkpoint that found the disk full."""
    last = logdir / "checkpoints" / "last.ckpt"
    kept = f"{last} is intact, as of its previous save" if last.is_file() else "no last.ckpt had been saved yet"
    return (
        f"the disk is full: checkpoint '{err.filename}' could not be written ({err.strerror}); {kept}. "
        f"Free some space, then go on with main.py -r {logdir} -t."
    )


def execute(run: Run, opt: argparse.Namespace) -> int:
    """Train and/or test; returns the exit code (143 after SIGTERM, as a process killed by it would; 1 when a
    checkpoint found the disk full; 2 when the checkpoint to resume from cannot be loaded)."""
    trainer = run.trainer
    try:
        if opt.train:
            trainer.fit(run.model, run.data, ckpt_path=run.ckpt)
        if not opt.no_test and not trainer.interrupted and has_test(run.model, run.data):
            trainer.test(run.model, run.data, ckpt_path=None if opt.train else run.ckpt)
    except SIGTERMException:
        return 143
    except DiskFullError as err:
        if opt.debug:
            raise
        return print_error(disk_full(err, run.logdir), code=1)
    except CheckpointError as err:  # the resume checkpoint, as Lightning loads it
        if opt.debug:
            raise
        return print_error(err)
    except Exception:
        if opt.debug and trainer.is_global_zero:
            import pdb

            pdb.post_mortem()
        raise
    # One write, so that the lines of several ranks sharing a terminal do not interleave.
    sys.stdout.write(f"[rank {trainer.global_rank}] finished at global step {trainer.global_step}: {run.logdir}\n")
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run main.py with ``argv`` (default: the command line); returns the exit code."""
    try:
        opt, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    now = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    try:
        run = build(opt, overrides, now)
    except (UserError, OSError) as err:
        if opt.debug:
            raise
        return print_error(err)
    previous = os.environ.get(LOGDIR_ENV)
    os.environ[LOGDIR_ENV] = str(run.logdir)
    try:
        return execute(run, opt)
    finally:
        if previous is None:
            os.environ.pop(LOGDIR_ENV, None)
        else:
            os.environ[LOGDIR_ENV] = previous


if __name__ == "__main__":
    sys.exit(main())
