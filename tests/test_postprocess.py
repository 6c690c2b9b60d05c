"""The output step: safety check, watermark, metadata and numbered saving, usable outside the scripts."""

from PIL import Image

from ldm.inference import GenerationResult
from ldm.outputs import read_parameters
from ldm.postprocess import OutputStep


def result(colours: list[tuple[int, int, int]], seed: int = 10) -> GenerationResult:
    return GenerationResult(
        images=[Image.new("RGB", (8, 8), c) for c in colours],
        seeds=[seed + i for i in range(len(colours))],
        prompts=["a fox"] * len(colours),
        negative_prompts=[""] * len(colours),
        steps=5,
        sampler="Euler a",
        scale=7.5,
        width=8,
        height=8,
        strength=None,
        eta=None,
        clip_skip=1,
        model_name="model",
        model_hash=None,
    )


def flag_red(images):
    flags = [im.getpixel((0, 0)) == (255, 0, 0) for im in images]
    return [Image.new("RGB", im.size) if bad else im for im, bad in zip(images, flags, strict=True)], flags


def test_the_step_checks_watermarks_and_saves_numbered_files_with_their_parameters(tmp_path):
    flagged = []
    step = OutputStep(
        tmp_path,
        safety_checker=flag_red,
        watermarker=lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        grid_images_per_row=2,
        on_flagged=flagged.append,
    )
    written = list(step.save(result([(255, 0, 0), (0, 255, 0)])))
    written += list(step.save(result([(0, 0, 255)], seed=20)))
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    assert flagged == [10]
    assert Image.open(written[0]).getpixel((0, 0)) == (0, 0, 0)
    assert "Seed: 11" in read_parameters(written[1]) and "Seed: 20" in read_parameters(written[2])
    grid = list(step.finish())
    assert [p.name for p in grid] == ["grid-0000.png"] and "Seed: 10" in read_parameters(grid[0])
    assert list(step.finish()) == []


def test_without_samples_only_the_grid_is_written(tmp_path):
    step = OutputStep(tmp_path, save_samples=False, grid_images_per_row=1)
    assert list(step.save(result([(1, 2, 3)]))) == []
    assert [p.name for p in step.finish()] == ["grid-0000.png"]
    assert not (tmp_path / "samples").exists()


def test_put_watermark_is_importable_from_scripts_txt2img_as_the_originals_img2img_expects():
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    put_watermark = importlib.import_module("scripts.txt2img").put_watermark

    class Encoder:  # imwatermark's interface: encode(BGR uint8 array, method) -> array
        def encode(self, bgr, method):
            assert method == "dwtDct" and bgr.shape == (256, 300, 3)
            return 255 - bgr

    image = Image.new("RGB", (300, 256), (10, 20, 30))
    assert put_watermark(image) is image
    assert put_watermark(image, Encoder()).getpixel((0, 0)) == (245, 235, 225)
