"""The originals' configs in ``../shared/reference/original/`` build unchanged, with the originals' state dicts.

Each config is built on the meta device (no memory, no weights) and its ``state_dict()`` compared key by key, shape
and dtype with ``NAME.keys.tsv`` beside it (what the original implementation builds from it). Not covered here:
``karlo/`` (no top-level ``target:``, not buildable in the original either) and ``generative-models/`` (SDXL, sgm's
``DiffusionEngine``: checked in test_sdxl.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from ldm.util import ConfigError, instantiate_from_config, load_config

ORIGINAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "original"
SKIPPED_FOLDERS = ("karlo", "generative-models")

# Keys naming files that the originals' configs point at but no repository ships.
FILE_KEYS = ("ckpt_path", "clip_stats_path")


def original_configs() -> list[str]:
    if not ORIGINAL.is_dir():
        return []
    return sorted(
        str(p.relative_to(ORIGINAL))
        for p in ORIGINAL.rglob("*.yaml")
        if not any(folder in p.relative_to(ORIGINAL).parts for folder in SKIPPED_FOLDERS)
    )


CONFIGS = original_configs()
needs_reference = pytest.mark.skipif(not CONFIGS, reason=f"reference data {ORIGINAL} is absent (../shared/)")


def file_keys(node: object, path: str) -> Iterator[tuple[str, str]]:
    """``(config path, file)`` of every ckpt_path / clip_stats_path under ``node`` whose file does not exist."""
    if isinstance(node, DictConfig):
        for key, value in node.items():
            where = f"{path}.{key}"
            if key in FILE_KEYS and isinstance(value, str) and not Path(value).exists():
                yield where, value
            else:
                yield from file_keys(value, where)
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            yield from file_keys(value, f"{path}.{i}")


def without_missing_files(config: DictConfig) -> DictConfig:
    """``config`` with every key that names a missing file removed (as the original needs to build it)."""
    config = copy.deepcopy(config)
    for where, _ in list(file_keys(config.model, "model")):
        *parents, key = where.split(".")[1:]
        node = config.model
        for parent in parents:
            node = node[int(parent)] if isinstance(node, ListConfig) else node[parent]
        del node[key]
    return config


def build(config: DictConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return instantiate_from_config(config.model, path="model")


def reference_keys(path: Path) -> dict[str, tuple[str, str]]:
    """``{key: (shape, dtype)}`` from a ``.keys.tsv``: shapes as ``320x4x3x3`` ("" for a scalar), dtypes as
    ``float32``."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return {key: (shape, dtype) for key, shape, dtype in rows}


def state_dict_keys(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    return {
        key: ("x".join(str(n) for n in tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for key, tensor in model.state_dict().items()
    }


@needs_reference
@pytest.mark.filterwarnings("ignore:LPIPSWithDiscriminator. no perceptual_weights")
@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_the_originals_state_dict(name):
    config = load_config(ORIGINAL / name)
    missing = list(file_keys(config.model, "model"))
    if missing:
        # As shipped, the build stops at the first missing file, in one line naming the key and the file.
        with pytest.raises(ConfigError) as err:
            build(config)
        message = str(err.value)
        assert "\n" not in message
        assert any(message.startswith(f"{key}: ") and f"'{file}' does not exist" in message for key, file in missing)
    model = build(without_missing_files(config))
    keys_file = (ORIGINAL / name).with_name(Path(name).stem + ".keys.tsv")
    if not keys_file.exists():
        return
    expected, actual = reference_keys(keys_file), state_dict_keys(model)
    assert sorted(set(expected) - set(actual)) == [], "keys the original has and this model lacks"
    assert sorted(set(actual) - set(expected)) == [], "keys this model has and the original lacks"
    assert {k: v for k, v in actual.items() if v != expected[k]} == {}, "keys whose (shape, dtype) differ"


@needs_reference
def test_every_original_config_is_covered(capsys):
    # 38 configs: karlo/ (3) and generative-models/ (SDXL, 2) are not counted here.
    assert len(CONFIGS) == 33, CONFIGS
    with capsys.disabled():
        print(f"\n{len(CONFIGS)} of {len(CONFIGS)} original configs build (karlo/ and SDXL not counted)")
