"""The A1111 feature flags of the generation scripts (ldm.cli): folders of inputs, the X/Y grid, the hires fix and
variation seeds, called through ``ldm.cli.main`` on the tiny model (see tests/test_scripts.py)."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm import cli
from ldm.masking import blur_mask
from ldm.outputs import parse_parameters, read_parameters
from ldm.xy_grid import AXES, draw_grid, parse_axis
from tests.feature_helpers import box_mask, random_image


@pytest.fixture(scope="module")
def tiny_files(tiny_config, tiny_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    OmegaConf.save(tiny_config, folder / "tiny.yaml")
    (folder / "tiny.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    inputs = folder / "inputs"
    inputs.mkdir()
    random_image((24, 20), 1).save(inputs / "a.png")
    random_image((16, 16), 2).save(inputs / "b.jpg")
    box_mask((24, 20), (8, 4, 16, 12)).save(inputs / "a_mask.png")
    (inputs / "notes.txt").write_text("not an image")
    random_image((24, 20), 3).save(folder / "init.png")
    return folder


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(mode: str, folder: Path, capsys, *extra: str) -> tuple[int, str]:
    args = ["--config", str(folder / "tiny.yaml"), "--ckpt", str(folder / "tiny.safetensors"), "--device", "cpu",
            "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", *extra]  # fmt: skip
    code = cli.main(mode, args)
    return code, capsys.readouterr().err


def samples(out: Path) -> list[dict[str, str]]:
    return [parse_parameters(read_parameters(p)) for p in sorted((out / "samples").glob("*.png"))]


def test_img2img_over_a_folder_writes_one_sample_per_image_at_its_size_and_never_overwrites(
    tiny_files, tmp_path, capsys
):
    out = tmp_path / "out"
    for _ in range(2):
        code, err = run("img2img", tiny_files, capsys, "--indir", str(tiny_files / "inputs"), "--outdir", str(out))
        assert code == 0, err
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [Image.open(f).size for f in files] == [(24, 20), (16, 16)] * 2
    assert [fields["Size"] for fields in samples(out)] == ["24x20", "16x16"] * 2
    assert all(fields["Denoising strength"] == "0.75" for fields in samples(out))
    assert not list(out.glob("grid-*.png"))


def test_inpaint_over_a_folder_takes_its_image_mask_pairs(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run("inpaint", tiny_files, capsys, "--indir", str(tiny_files / "inputs"), "--outdir", str(out),
                    "--mask_blur", "1")  # fmt: skip
    assert code == 0, err
    (result,) = sorted((out / "samples").glob("*.png"))
    init = np.asarray(Image.open(tiny_files / "inputs" / "a.png")).astype(int)
    kept = np.asarray(blur_mask(Image.open(tiny_files / "inputs" / "a_mask.png").convert("L"), 1)) == 0
    assert np.array_equal(np.asarray(Image.open(result)).astype(int)[kept], init[kept])
    assert samples(out)[0]["Mask blur"] == "1"


def test_inpaint_with_invert_mask_keeps_the_masked_pixels(tiny_files, tmp_path, capsys):
    """The script checks the request in its plan and again in the run: the mask is inverted once all the same."""
    out = tmp_path / "out"
    inputs = tiny_files / "inputs"
    code, err = run("inpaint", tiny_files, capsys, "--init-img", str(inputs / "a.png"), "--mask",
                    str(inputs / "a_mask.png"), "--outdir", str(out), "--invert_mask")  # fmt: skip
    assert code == 0, err
    (result,) = sorted((out / "samples").glob("*.png"))
    init = np.asarray(Image.open(inputs / "a.png")).astype(int)
    white = np.asarray(Image.open(inputs / "a_mask.png").convert("L")) == 255
    got = np.asarray(Image.open(result)).astype(int)
    assert np.array_equal(got[white], init[white]) and not np.array_equal(got[~white], init[~white])
    assert samples(out)[0]["Mask mode"] == "Inpaint not masked"


@pytest.mark.parametrize(
    "mode, extra, message",
    [
        ("img2img", [], "the following arguments are required: --init-img (or --indir"),
        ("img2img", ["--indir", "{folder}/inputs", "--init-img", "{folder}/init.png"], "not both"),
        ("img2img", ["--indir", "{folder}/nowhere"], "'{folder}/nowhere' is not a folder"),
        ("inpaint", ["--indir", "{folder}/inputs", "--mask", "{folder}/init.png"], "each image's mask is beside it"),
        ("txt2img", ["--xy_x", "stepz:1,2"], "unknown axis 'stepz'; give NAME:V1,V2,... with NAME one of: Seed,"),
        ("txt2img", ["--xy_x", "steps:1,two"], "'two' is not a whole number; Steps takes whole numbers"),
        ("txt2img", ["--xy_y", "sampler:DDIM,Nope"], "X/Y grid cell sampler='Nope': unknown sampler 'Nope'"),
        ("txt2img", ["--xy_x", "prompt s/r:dog,cat"], "Prompt S/R: 'dog' is not in the prompt"),
        ("txt2img", ["--enable_hr", "--hr_upscaler", "ESRGAN"], "unknown hr_upscaler 'ESRGAN'; choose one of: Latent"),
        ("txt2img", ["--subseed_strength", "2"], "subseed_strength must be a number in [0, 1]"),
    ],
)
def test_bad_feature_input_is_one_line_before_anything_is_written(tiny_files, tmp_path, capsys, mode, extra, message):
    out = tmp_path / "out"
    extra = [a.format(folder=tiny_files) for a in extra]
    code, err = run(mode, tiny_files, capsys, "--outdir", str(out), *extra)
    assert code == 2 and message.format(folder=tiny_files) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_xy_grid_has_a_labelled_cell_per_pair_and_each_cells_settings(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    axes = ["--xy_x", "steps:1-3", "--xy_y", "prompt s/r:red,blue"]
    code, err = run("txt2img", tiny_files, capsys, "--prompt", "a red circle", "--H", "16", "--W", "16", *axes,
                    "--seed", "9", "--outdir", str(out))  # fmt: skip
    assert code == 0, err
    cells = samples(out)
    assert [(c["Steps"], c["Prompt"]) for c in cells] == [
        ("1", "a red circle"), ("2", "a red circle"), ("3", "a red circle"),
        ("1", "a blue circle"), ("2", "a blue circle"), ("3", "a blue circle"),
    ]  # fmt: skip
    assert all(c["Seed"] == "9" for c in cells)
    (grid_file,) = out.glob("grid-*.png")
    grid = Image.open(grid_file)
    expected = draw_grid([[Image.new("RGB", (16, 16))] * 3] * 2, ["Steps: 1", "Steps: 2", "Steps: 3"],
                         ["Prompt S/R: red", "Prompt S/R: blue"])  # fmt: skip
    assert grid.size == expected.size and grid.width > 3 * 16 + 40 and grid.height > 2 * 16 + 8
    assert parse_parameters(read_parameters(grid_file))["Steps"] == "1"
    labels = np.asarray(grid.convert("L"))[:8, :]
    assert (labels < 128).any(), "column labels are drawn above the cells"


def test_axis_values_read_a1111_ranges_and_quotes():
    assert parse_axis("steps:1-9 (+4)", "--xy_x").values == (1, 5, 9)
    assert parse_axis("cfg:0-1 [3]", "--xy_x").values == (0.0, 0.5, 1.0)
    assert parse_axis('prompt s/r:red,"blue, dark"', "--xy_x").values == ("red", "blue, dark")
    assert parse_axis("size:16x24,32x16", "--xy_x").values == ((16, 24), (32, 16))
    assert {a.label for a in AXES.values()} >= {"Seed", "Steps", "CFG Scale", "Sampler", "Denoising", "Clip skip"}


def test_hires_and_variation_flags_reach_the_infotext(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run("txt2img", tiny_files, capsys, "--H", "8", "--W", "8", "--enable_hr", "--hr_scale", "1.5",
                    "--hr_upscaler", "Latent (nearest)", "--subseed", "100", "--subseed_strength", "0.25",
                    "--n_iter", "2", "--seed", "5", "--skip_grid", "--outdir", str(out))  # fmt: skip
    assert code == 0, err
    cells = samples(out)
    assert [Image.open(p).size for p in sorted((out / "samples").glob("*.png"))] == [(12, 12)] * 2
    assert [(c["Seed"], c["Variation seed"]) for c in cells] == [("5", "100"), ("5", "101")]
    assert all(c["Hires upscale"] == "1.5" and c["Hires upscaler"] == "Latent (nearest)" for c in cells)
    assert all(c["Size"] == "8x8" and c["Variation seed strength"] == "0.25" for c in cells)


def test_inpaint_script_sends_indir_to_the_sd_form_unless_it_is_compvis_ldm(tiny_files, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("inpaint_script", Path(__file__).parents[1] / "scripts/inpaint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.runs_compvis_ldm(["--indir", "in", "--outdir", "out"])  # CompVis's defaults
    assert not script.runs_compvis_ldm(["--indir", "in", "--ckpt", "sd.ckpt"])
    assert not script.runs_compvis_ldm(["--indir=in", f"--config={tiny_files / 'tiny.yaml'}", "--ckpt", "x"])
    ldm = tmp_path / "ldm.yaml"
    ldm.write_text("model:\n  params:\n    cond_stage_config: __is_first_stage__\n")
    assert script.runs_compvis_ldm(["--indir", "in", "--config", str(ldm)])
    assert not script.runs_compvis_ldm(["--init-img", "a.png", "--config", str(ldm)])
