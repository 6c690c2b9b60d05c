"""The bundled demo model in models/ldm/shapes/: it loads strictly, generates in seconds, and warns on unknown words."""

import time
import warnings
from pathlib import Path

import pytest

from ldm.checkpoint import load_model_from_config
from ldm.inference import Pipeline
from ldm.util import load_config

DEMO = Path(__file__).resolve().parents[1] / "models" / "ldm" / "shapes"
pytestmark = pytest.mark.skipif(
    not (DEMO / "model.safetensors").exists(), reason=f"the bundled demo model is absent from {DEMO}"
)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_config(DEMO / "config.yaml", DEMO / "model.safetensors", device="cpu", precision="full")


def test_bundled_files_are_small_and_load_strictly():
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 30 * 2**20
    model = load_model_from_config(load_config(DEMO / "config.yaml"), DEMO / "model.safetensors", device="cpu")
    assert model.cond_stage_model is not None


def test_four_images_in_seconds(pipe):
    start = time.perf_counter()
    result = pipe.generate(
        "a red circle on a blue background", n=4, steps=20, sampler="DPM++ 2M Karras", scale=4.0, seed=0, progress=False
    )
    elapsed = time.perf_counter() - start
    assert len(result.images) == 4 and result.images[0].size == (64, 64)
    assert elapsed < 15, f"4 images took {elapsed:.1f} s"


def test_words_outside_the_vocabulary_warn_but_work(pipe):
    with pytest.warns(UserWarning, match="does not know dragon"):
        result = pipe.generate("a red dragon on a blue background", steps=2, seed=0, progress=False)
    assert len(result.images) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("a (green:1.2) star on a white background", steps=2, seed=0, progress=False)
