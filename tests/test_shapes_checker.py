"""The pixel checker of ldm/data/shapes_checker.py and scripts/evaluate_shapes.py, which samples a model and checks it.

The checker is tested on the dataset's own images (it must read them all but perfectly) and on mildly degraded
ones, as generated images are; the evaluation runs end to end on the tiny random-weight model (accuracy at chance,
so only its structure is checked) and, once it is trained, on the bundled demo model.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm.data.shapes import COLORS, COMBINATIONS, HOLDOUT, SHAPES, ShapesDataset, caption, draw
from ldm.data.shapes_checker import Prediction, accuracy, classify, shape_scores
from ldm.inference import Pipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "ldm" / "shapes"


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_shapes", ROOT / "scripts" / "evaluate_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


evaluate_shapes = _load_script()


def dataset_images(split: str, length: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    items = [ShapesDataset(size=64, length=length, split=split, seed=seed)[i] for i in range(length)]
    images = [((item["jpg"] + 1.0) * 127.5).round().astype(np.uint8) for item in items]
    return images, [(item["color"], item["shape"], item["background"]) for item in items]


# ---------------------------------------------------------------------------------------------------------------------
# The checker


@pytest.mark.parametrize("split, length", [("train", 500), ("holdout", 200)])
def test_checker_reads_the_datasets_own_images(split, length):
    images, truths = dataset_images(split, length)
    scores = accuracy([classify(image) for image in images], truths)
    assert min(scores["color"], scores["shape"], scores["background"]) >= 0.99, scores


@pytest.mark.parametrize(
    "degrade",
    [
        pytest.param(lambda image, rng: image.filter(ImageFilter.GaussianBlur(1.0)), id="blur"),
        pytest.param(
            lambda image, rng: np.clip(np.asarray(image) + rng.normal(0.0, 12.0, (64, 64, 3)), 0, 255).astype(np.uint8),
            id="noise",
        ),
        pytest.param(
            lambda image, rng: Image.fromarray(
                np.clip(
                    np.asarray(image.filter(ImageFilter.GaussianBlur(0.7))) + rng.normal(0.0, 8.0, (64, 64, 3)), 0, 255
                ).astype(np.uint8)  # fmt: skip
            ),
            id="blur+noise",
        ),
    ],
)
def test_checker_still_reads_mildly_blurred_or_noisy_images(degrade):
    rng = np.random.default_rng(0)
    images, truths = dataset_images("train", 30, seed=5)
    predictions = [classify(degrade(Image.fromarray(image), rng)) for image in images]
    assert [tuple(p) for p in predictions] == truths


def test_checker_ignores_specks_away_from_the_shape():
    image = np.array(draw("blue", "star", "yellow", 64, 20.0, 20.0, 12.0))
    image[50:54, 50:54] = COLORS["red"]  # survives the median filter; the largest region is still the star
    image[4, 60] = COLORS["white"]
    image[58:60, 8:10] = COLORS["blue"]
    assert classify(image) == ("blue", "star", "yellow")


def test_checker_accepts_pil_and_arrays_of_any_size_and_finds_no_shape_on_a_plain_image():
    image = draw("green", "triangle", "black", 96, 40.0, 50.0, 20.0)
    assert classify(image) == classify(np.asarray(image)) == Prediction("green", "triangle", "black")
    assert classify(Image.new("RGB", (64, 64), COLORS["pink"])) == Prediction(None, None, "pink")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        classify(np.zeros((64, 64), dtype=np.uint8))


def test_shape_scores_prefer_the_drawn_shape_by_a_margin():
    for shape in SHAPES:
        mask = np.asarray(draw("white", shape, "black", 64, 32.0, 32.0, 15.0))[..., 0] > 128
        scores = shape_scores(mask)
        runner_up = max(v for k, v in scores.items() if k != shape)
        assert scores[shape] > 0.9 and scores[shape] - runner_up > 0.1, (shape, scores)


def test_accuracy_counts_each_attribute_and_all_three():
    truths = [
        ("red", "circle", "blue"),
        ("pink", "star", "white"),
        ("black", "square", "green"),
        ("red", "star", "blue"),
    ]
    predictions = [
        Prediction("red", "circle", "blue"),
        Prediction("pink", "diamond", "white"),
        Prediction(None, None, "green"),
        ("red", "star", "yellow"),
    ]
    assert accuracy(predictions, truths) == {"color": 0.75, "shape": 0.5, "background": 0.75, "all": 0.25}
    with pytest.raises(ValueError, match="2 predictions for 4 truths"):
        accuracy(predictions[:2], truths)
    with pytest.raises(ValueError, match="at least one"):
        accuracy([], [])


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation


def test_seen_combinations_are_training_ones_balanced_over_every_word():
    seen = evaluate_shapes.seen_combinations(24)
    assert len(set(seen)) == 24 and not set(seen) & set(HOLDOUT) and set(seen) <= set(COMBINATIONS)
    for i, words in enumerate((COLORS, SHAPES, COLORS)):
        assert {c[i] for c in seen} == set(words)
    assert evaluate_shapes.seen_combinations(6) == seen[:6]
    assert sorted(evaluate_shapes.seen_combinations(268)) == sorted(set(COMBINATIONS) - set(HOLDOUT))
    with pytest.raises(ValueError, match="between 0 and 268"):
        evaluate_shapes.seen_combinations(269)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_config, tiny_dir) -> Pipeline:
    return Pipeline.from_config(tiny_config, tiny_dir / "model.safetensors", device="cpu", precision="full")


def test_evaluate_runs_end_to_end_on_the_tiny_model(tiny_pipeline):
    combinations = [evaluate_shapes.seen_combinations(1)[0], HOLDOUT[0]]
    start = time.perf_counter()
    evaluation = evaluate_shapes.evaluate(
        tiny_pipeline, combinations, n=2, steps=2, sampler="DDIM", scale=3.0, seed=10, batch=3, size=16
    )
    assert time.perf_counter() - start < 30.0
    samples = evaluation.samples
    assert [s.combination for s in samples] == [combinations[0]] * 2 + [combinations[1]] * 2
    assert [s.seed for s in samples] == [10, 11, 12, 13]
    assert [s.group for s in samples] == ["seen", "seen", "held out", "held out"]
    assert all(s.image.size == (16, 16) and s.prediction == classify(s.image) for s in samples)
    scores = evaluation.accuracy()
    assert set(scores) == {"seen", "held out"}
    for group in scores.values():
        assert set(group) == {"color", "shape", "background", "all", "images"} and group["images"] == 2
        assert all(0.0 <= group[k] <= 1.0 for k in ("color", "shape", "background", "all"))
    results = json.loads(json.dumps(evaluation.to_json()))
    assert results["images"][2]["prompt"] == caption(*HOLDOUT[0]) and results["settings"]["steps"] == 2

    # Batching changes nothing but float rounding: image k is made from its own seed.
    single = evaluate_shapes.evaluate(
        tiny_pipeline, combinations[1:], n=1, steps=2, sampler="DDIM", scale=3.0, seed=12, batch=1, size=16
    )
    difference = np.asarray(single.samples[0].image).astype(int) - np.asarray(samples[2].image)
    assert np.abs(difference).max() <= 2

    grid = evaluate_shapes.make_labelled_grid(evaluation, n=2)
    assert grid.height >= 2 * 16 and grid.width > 2 * 16
    with pytest.raises(ValueError, match="at least one"):
        evaluate_shapes.evaluate(tiny_pipeline, [], n=2)


def test_script_writes_table_grid_and_json_and_reports_bad_input_in_one_line(tiny_config, tiny_dir, tmp_path, capsys):
    from omegaconf import OmegaConf

    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    ckpt = str(tiny_dir / "model.safetensors")
    out = tmp_path / "out"
    args = ["--config", str(config), "--ckpt", ckpt, "--device", "cpu", "--steps", "2", "--n", "1", "--size", "16"]
    code = evaluate_shapes.main(
        [*args, "--seen", "1", "--batch", "13", "--outdir", str(out), "--json", str(out / "r.json")]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "seen" in printed.out and "held out" in printed.out and "all three" in printed.out
    assert (out / "grid-0000.png").is_file()
    results = json.loads((out / "r.json").read_text())
    assert results["accuracy"]["seen"]["images"] == 1 and results["accuracy"]["held out"]["images"] == len(HOLDOUT)
    assert results["settings"]["sampler"] == "DPM++ 2M Karras" and results["settings"]["scale"] == 10.0

    for bad, message in [
        (["--config", str(config), "--ckpt", str(tmp_path / "missing.safetensors")], "does not exist; check --ckpt"),
        (["--config", str(tmp_path / "missing.yaml"), "--ckpt", ckpt], "does not exist; check --config"),
        ([*args, "--seen", "300"], "between 0 and 268"),
        ([*args, "--sampler", "nonsense"], "unknown sampler"),
        ([*args, "--size", "30"], "not a multiple"),
        ([*args, "--n", "many"], "invalid int value"),
    ]:
        assert evaluate_shapes.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.skipif(
    not (DEMO / "model.safetensors").is_file(),
    reason="the demo model is not trained yet (models/ldm/shapes/model.safetensors is absent)",
)
def test_demo_model_draws_seen_prompts_right_at_least_90_percent_per_attribute():
    pipeline = Pipeline.from_config(DEMO / "config.yaml", DEMO / "model.safetensors", device="cpu", precision="full")
    evaluation = evaluate_shapes.evaluate(
        pipeline, evaluate_shapes.seen_combinations(6), n=2, steps=20, scale=10.0, seed=0, batch=12
    )
    scores = evaluation.accuracy()["seen"]
    assert min(scores["color"], scores["shape"], scores["background"]) >= 0.9, scores
