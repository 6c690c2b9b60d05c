"""Shared fixtures: the reference data in ``../shared/`` beside the project root, and scripts/benchmark.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
TINY = REFERENCE / "tiny"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared/ beside the project root)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/reference``; the test is skipped where it is absent."""
    return _require(REFERENCE)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """``../shared/reference/tiny``: a tiny SD-v1-layout model and the original's outputs."""
    return _require(TINY)


@pytest.fixture(scope="session")
def tiny_cases(tiny_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "cases.safetensors"))


@pytest.fixture(scope="session")
def tiny_weights(tiny_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny_dir / "model.safetensors"))


def _assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.fixture(scope="session")
def assert_matches_reference():
    """``assert_matches_reference(actual, expected)`` with the tolerance ``../shared/README.md`` states."""
    return _assert_matches_reference


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path):
    """The tiny reference model's original config, with its small text encoder given by a command-line override."""
    from ldm.util import load_config

    return load_config(
        tiny_dir / "original-config.yaml",
        [f"model.params.cond_stage_config.params.text_config={tiny_dir / 'text-config.json'}"],
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tiny_dir: Path):
    """The tiny LatentDiffusion with the reference weights, loaded strictly, on the CPU."""
    from ldm.checkpoint import load_model_from_config

    return load_model_from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu")


@pytest.fixture(scope="module")
def hash_cache(tmp_path_factory):
    """Model hashes are cached under $XDG_CACHE_HOME; keep a module's cache out of the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def pipe(tiny_config, tiny_dir, hash_cache):
    """The tiny reference model as a full-precision CPU ``Pipeline``, one per test module (modules set LoRA folders,
    refiners ... on it)."""
    from ldm.inference import Pipeline

    return Pipeline.from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu", precision="full")


@pytest.fixture(scope="session")
def demo_server():
    """``scripts/serve.py`` serving the bundled demo model in a subprocess on a free loopback port (one for the
    session: the client, browser and load tests share it); skipped without the server's packages or the model."""
    pytest.importorskip("fastapi", reason="the server needs fastapi and uvicorn (requirements.txt)")
    pytest.importorskip("uvicorn", reason="the server needs fastapi and uvicorn (requirements.txt)")
    from tests.server_helpers import DEMO_ARGS, DEMO_CKPT, start_server

    if not DEMO_CKPT.exists():
        pytest.skip(f"the bundled demo model is absent: {DEMO_CKPT}")
    with start_server(*DEMO_ARGS) as server:
        yield server


@pytest.fixture(scope="module")
def benchmark():
    """scripts/benchmark.py as a module (it is not in a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["benchmark"]
