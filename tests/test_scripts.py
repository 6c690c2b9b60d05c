"""scripts/txt2img.py, img2img.py and inpaint.py as a user runs them, on the tiny model written to a temp dir.

Every Python start costs seconds (torch, transformers, Lightning), so one run is a real subprocess (a bad input's
whole stderr); the others run the script files in this process (``programs.run_program``) or call ``ldm.cli.main``,
which is all a script does (``sys.exit(main("txt2img"))``).
"""

import errno
import hashlib
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from programs import run_program

from ldm import cli
from ldm.outputs import parse_parameters, read_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_files(tiny_config, tiny_dir, tmp_path_factory) -> Path:
    """A folder with ``tiny.yaml`` (the tiny config, text encoder override baked in) and ``tiny.safetensors``."""
    folder = tmp_path_factory.mktemp("tiny")
    OmegaConf.save(tiny_config, folder / "tiny.yaml")
    try:
        (folder / "tiny.safetensors").symlink_to(tiny_dir / "model.safetensors")
    except OSError:
        (folder / "tiny.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = Image.new("L", (24, 20), 0)
    mask.paste(255, (8, 4, 16, 12))
    mask.save(folder / "mask.png")
    Image.new("L", (12, 12), 255).save(folder / "small-mask.png")
    (folder / "garbage.png").write_text("this is not a PNG")
    (folder / "prompts.txt").write_text("a red circle\n\na blue square\na green (triangle:1.2)\n")
    (folder / "bad.yaml").write_text("model: [unclosed\n  a: b: c\n")
    (folder / "list.yaml").write_text("- model\n- params\n")
    return folder


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_args(folder: Path, *extra: str) -> list[str]:
    return ["--config", str(folder / "tiny.yaml"), "--ckpt", str(folder / "tiny.safetensors"), "--device", "cpu",
            "--ddim_steps", "3", *extra]  # fmt: skip


def run_script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_txt2img_writes_numbered_samples_and_grids_with_metadata_and_never_overwrites(tiny_files, tmp_path):
    out = tmp_path / "out"
    first = run_program(
        "txt2img.py",
        *tiny_args(
            tiny_files,
            "--prompt",
            "a red circle",
            "--negative_prompt",
            "blue, dark",
            "--H",
            "16",
            "--W",
            "16",
            "--n_samples",
            "2",
            "--n_iter",
            "1",
            "--seed",
            "7",
            "--outdir",
            str(out),
        ),  # fmt: skip
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    expected_hash = hashlib.sha256((tiny_files / "tiny.safetensors").read_bytes()).hexdigest()[:10]
    assert parse_parameters(read_parameters(out / "samples" / "00001.png")) == {
        "Prompt": "a red circle",
        "Negative prompt": "blue, dark",
        "Steps": "3",
        "Sampler": "DDIM",
        "CFG scale": "7.5",
        "Seed": "8",
        "Size": "16x16",
        "Model hash": expected_hash,
        "Model": "tiny",
    }
    before = {p.name: p.read_bytes() for p in (out / "samples").iterdir()}

    second = run_program(
        "txt2img.py",
        *tiny_args(
            tiny_files,
            "--from-file",
            str(tiny_files / "prompts.txt"),
            "--H",
            "16",
            "--W",
            "16",
            "--n_samples",
            "2",
            "--n_iter",
            "1",
            "--sampler",
            "Euler a",
            "--outdir",
            str(out),
        ),  # fmt: skip
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png"]
    assert all((out / "samples" / name).read_bytes() == data for name, data in before.items()), "nothing overwritten"
    written = [parse_parameters(read_parameters(out / "samples" / f"0000{i}.png")) for i in (2, 3, 4)]
    assert [p["Prompt"] for p in written] == ["a red circle", "a blue square", "a green (triangle:1.2)"]
    assert [p["Seed"] for p in written] == ["42", "43", "44"]
    assert {p["Sampler"] for p in written} == {"Euler a"}
    with Image.open(out / "grid-0001.png") as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2), "batches of 2 prompts: 2 images a row, 2 rows"


def test_a_bad_input_exits_2_with_one_line_and_no_output(tiny_files, tmp_path):
    out = tmp_path / "out"
    result = run_script("img2img", tiny_args(tiny_files, "--init-img", "missing.png", "--outdir", str(out)), tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: init image 'missing.png' does not exist; check the path.\n"
    assert not out.exists()


def run_main(mode: str, args: list[str], capsys) -> tuple[int, str]:
    code = cli.main(mode, args)
    return code, capsys.readouterr().err


def test_img2img_uses_the_init_images_size_and_strength(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--init-img", str(tiny_files / "init.png"), "--n_samples", "1", "--n_iter", "1",
                     "--skip_grid", "--outdir", str(out))  # fmt: skip
    code, err = run_main("img2img", args, capsys)
    assert code == 0, err
    image = Image.open(out / "samples" / "00000.png")
    assert image.size == (24, 20)
    fields = parse_parameters(read_parameters(out / "samples" / "00000.png"))
    assert fields["Denoising strength"] == "0.75" and fields["Size"] == "24x20"
    assert not list(out.glob("grid-*.png"))


def test_inpaint_repaints_only_the_white_part_of_the_mask(tiny_files, tmp_path, capsys):
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--init-img", str(tiny_files / "init.png"), "--mask", str(tiny_files / "mask.png"),
                     "--n_samples", "1", "--n_iter", "1", "--outdir", str(out))  # fmt: skip
    code, err = run_main("inpaint", args, capsys)
    assert code == 0, err
    result = np.asarray(Image.open(out / "samples" / "00000.png")).astype(int)
    init = np.asarray(Image.open(tiny_files / "init.png")).astype(int)
    repaint = np.asarray(Image.open(tiny_files / "mask.png")) > 0
    assert np.array_equal(result[~repaint], init[~repaint])
    assert np.abs(result[repaint] - init[repaint]).mean() > 5
    assert (out / "grid-0000.png").is_file()


VAE = "model.params.first_stage_config.params"
UNET = "model.params.unet_config.params"
BAD_INPUTS = [
    ("txt2img", ["--ckpt", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
    ("txt2img", ["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    ("img2img", ["--init-img", "{folder}/garbage.png"], "cannot read init image '.*garbage.png': not an image file"),
    ("txt2img", ["--H", "30"], "height 30 is not a multiple of 4 .*use 28 or 32"),
    ("inpaint", ["--init-img", "{folder}/init.png", "--mask", "{folder}/small-mask.png"], "the mask is 12x12 but"),
    ("inpaint", ["--init-img", "{folder}/init.png"], "the following arguments are required: --mask"),
    ("txt2img", ["--n_samples", "0"], "at least 1, got 0"),
    ("txt2img", ["--n_iter", "0"], "--n_iter must be at least 1"),
    ("txt2img", ["--precision", "fp16"], "precision fp16 needs a GPU"),
    ("txt2img", ["--precision", "half"], "invalid choice: 'half'"),
    ("txt2img", ["--sampler", "nope"], "unknown sampler 'nope'. Known samplers: DDIM, PLMS"),
    ("txt2img", ["--plms", "--sampler", "Euler"], "not allowed with argument --plms"),
    ("txt2img", ["nonsense"], "override 'nonsense' is not of the form key.sub=value"),
    ("txt2img", ["model.params.unet_config.params.bogus=1"], "unet_config.params.bogus: UNetModel has no parameter"),
    ("txt2img", ["--C", "3"], "--C 3 does not match the model's 4 latent channels"),
    ("img2img", ["--init-img", "{folder}/init.png", "--strength", "1.5"], r"strength must be in \[0, 1\]"),
    ("txt2img", ["--from-file", "none.txt"], "prompt file 'none.txt' does not exist"),
    ("txt2img", ["--batch_seeds", "1", "2"], "--batch_seeds gives 2 seeds for 6 images"),
    ("txt2img", ["--steps", "0"], "steps must be an integer in 1..1000"),
    ("txt2img", ["--plms", "--ddim_eta", "0.5"], "'PLMS' only works with eta = 0"),
    ("txt2img", ["--attention_slicing", "0"], "--attention_slicing takes a positive number of query rows or 'auto'"),
    ("txt2img", ["--attention_slicing", "half"], "--attention_slicing takes .*, got 'half'"),
    ("txt2img", ["--idle_device", "tpu"], "unknown device 'tpu' for --idle_device; use cpu"),
    ("txt2img", ["--sampler", ""], "the sampler name '' is empty; give one of DDIM, PLMS"),
    ("txt2img", ["--scale", "1e308"], r"the guidance scale must be in -100..100 \(7.5 is usual\), got 1e\+308"),
    ("txt2img", ["--seed", str(2**64)], rf"--seed {2**64} is out of range: seeds are integers in 0..{2**64 - 1}"),
    ("txt2img", ["--seed", "-1"], "--seed -1 is out of range"),
    ("txt2img", ["--seed", str(2**64 - 2)], rf"last image seed {2**64 + 3}, .*use --seed {2**64 - 6} or less"),
    ("txt2img", ["--batch_seeds", "1", "2", "3", "4", "5", "-6"], "--batch_seeds seed -6 is out of range"),
    ("img2img", ["--init-img", "{folder}/init.png", "--H", "0"], "height 0 is not a positive multiple of 4 .*use 4"),
    ("txt2img", [f"{VAE}.ddconfig.ch_mult=5"], rf"{VAE}.ddconfig.ch_mult must be a list of positive integers.*got 5"),
    ("txt2img", [f"{UNET}.channel_mult=3"], rf"{UNET}.channel_mult must be a list of positive integers.*got 3"),
    ("txt2img", ["model=5"], r"model: expected a mapping \(key: value\), got int 5"),
    ("txt2img", ["model.params.image_size=[1]"], r"model.params.image_size must be a positive integer .*got \[1\]"),
    ("txt2img", ["model.params.timesteps=0"], r"model.params.timesteps must be a positive integer .*got 0; fix"),
    ("txt2img", ["model.params.unet_config.target=os.path.sep"], "'os.path.sep' is a str, not a class or function"),
    ("txt2img", ["--config", "{folder}/bad.yaml"], "is not valid YAML: did not find expected ',' or ']' at line 2"),
    ("txt2img", ["--config", "{folder}/list.yaml"], "holds a list at its top level; a config is a mapping"),
]


@pytest.mark.parametrize(("mode", "extra", "message"), BAD_INPUTS, ids=[" ".join(b[1])[:40] for b in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_files, tmp_path, capsys, mode, extra, message):
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--outdir", str(out), *(a.format(folder=tiny_files) for a in extra))
    code, err = run_main(mode, args, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_default_checkpoint_says_what_to_download_and_names_the_demo_model(tmp_path, capsys, monkeypatch):
    try:
        cli.find_checkpoint(None)
        pytest.skip("a checkpoint is installed at the default path")
    except FileNotFoundError:
        pass
    code, err = run_main("txt2img", ["--outdir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "v1-5-pruned-emaonly.ckpt" in err and "models/ldm/stable-diffusion-v1/model.ckpt" in err
    demo = tmp_path / "shapes"
    demo.mkdir()
    (demo / "config.yaml").write_text("model: {}")
    (demo / "model.ckpt").write_bytes(b"")
    monkeypatch.setattr(cli, "DEMO_DIR", demo)
    code, err = run_main("txt2img", ["--outdir", str(tmp_path / "out")], capsys)
    assert code == 2 and f"--config {demo / 'config.yaml'} --ckpt {demo / 'model.ckpt'}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_an_absent_device_is_an_error(tiny_files, tmp_path, capsys):
    code, err = run_main("txt2img", [*tiny_args(tiny_files, "--outdir", str(tmp_path)), "--device", "cuda"], capsys)
    assert code == 2 and "device 'cuda' is not available here" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_an_absent_idle_device_is_an_error_naming_its_flag(tiny_files, tmp_path, capsys):
    args = [*tiny_args(tiny_files, "--outdir", str(tmp_path / "out")), "--idle_device", "cuda"]
    code, err = run_main("txt2img", args, capsys)
    assert code == 2 and "device 'cuda' is not available here (0 CUDA GPU(s)); use --idle_device cpu." in err


def test_speed_flags_reach_the_pipeline(tiny_files, tmp_path, capsys, monkeypatch):
    options = []
    from_config = cli.Pipeline.from_config
    monkeypatch.setattr(
        cli.Pipeline, "from_config", lambda *a, **kw: options.append(vars(a[2])) or from_config(*a, **kw)
    )
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--H", "16", "--W", "16", "--n_samples", "1", "--n_iter", "1", "--skip_grid",
                     "--outdir", str(out), "--channels_last", "--attention_slicing", "--vae_tiling", "--idle_device",
                     "cpu")  # fmt: skip
    code, err = run_main("txt2img", args, capsys)
    assert code == 0, err
    assert (out / "samples" / "00000.png").is_file()
    assert {k: options[0][k] for k in ("channels_last", "attention_slicing", "vae_tiling", "compile")} == {
        "channels_last": True,
        "attention_slicing": "auto",
        "vae_tiling": True,
        "compile": False,
    }
    assert options[0]["idle_device"] == torch.device("cpu")
    code, _ = run_main("txt2img", [*args[:-5], "--attention_slicing", "64"], capsys)
    assert code == 0 and options[1]["attention_slicing"] == 64


def test_an_unusable_compile_is_reported_before_loading(tiny_files, tmp_path, capsys, monkeypatch):
    def no_compiler(fn):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(cli.Pipeline, "from_config", lambda *a, **kw: pytest.fail("the model was loaded"))
    code, err = run_main("txt2img", [*tiny_args(tiny_files, "--outdir", str(tmp_path / "out")), "--compile"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "torch.compile does not work on cpu here (RuntimeError: InvalidCxxCompiler" in err
    assert err.rstrip().endswith("drop --compile, or install a C++ compiler (g++ or clang).")


# ---------------------------------------------------------------------------------------------------------------------
# Memory: jobs too large are refused before loading; allocation failures and full disks mid-run are one line


def free_memory(monkeypatch, *sizes: int) -> None:
    """Make ``available_memory`` report ``sizes`` in turn (the last one from then on), whatever this machine has."""
    answers = list(sizes)
    monkeypatch.setattr(cli, "available_memory", lambda device: answers.pop(0) if len(answers) > 1 else answers[0])


def never_load(monkeypatch) -> None:
    monkeypatch.setattr(cli.Pipeline, "from_config", lambda *a, **kw: pytest.fail("the model was loaded"))


TOO_LARGE = [
    (["--H", "8192", "--W", "8192"], "the UNet .*lower --H/--W or --n_samples"),
    (["--H", "99968", "--W", "99968"], "the UNet .*lower --H/--W or --n_samples"),
    (["--H", "100000", "--W", "100000"], "the UNet .*lower --H/--W or --n_samples"),
    (["--H", "16", "--W", "16", "--n_samples", "1000000"], "the UNet .*lower --H/--W or --n_samples"),
    (["--H", "16", "--W", "16", "--n_iter", "1000000000"], "the grid of all the run's images .*add --skip_grid"),
]


@pytest.mark.parametrize(("extra", "message"), TOO_LARGE, ids=[" ".join(t[0]) for t in TOO_LARGE])
def test_a_job_too_large_for_the_memory_is_refused_before_loading(tiny_files, tmp_path, capsys, monkeypatch, extra,
                                                                   message):  # fmt: skip
    free_memory(monkeypatch, 16 * 2**30)
    never_load(monkeypatch)
    out = tmp_path / "out"
    code, err = run_main("txt2img", tiny_args(tiny_files, "--outdir", str(out), *extra), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert re.match(rf"error: out of memory: this run needs about [\d.e+]+ GiB on cpu, most of it for {message}", err)
    assert "but 16.0 GiB is available" in err
    assert not out.exists()


@pytest.fixture
def sd_args(tmp_path) -> list[str]:
    """Stable Diffusion 1.x's config with a stand-in checkpoint: plan() only checks that the file exists."""
    (tmp_path / "sd.ckpt").write_bytes(b"")
    return ["--config", str(ROOT / "configs/stable-diffusion/v1-inference.yaml"), "--ckpt", str(tmp_path / "sd.ckpt"),
            "--device", "cpu", "--outdir", str(tmp_path / "out")]  # fmt: skip


def test_stable_diffusion_at_its_defaults_is_planned_on_a_24_gib_machine(sd_args, monkeypatch):
    free_memory(monkeypatch, 24 * 2**30)
    job = cli.plan("txt2img", cli.build_parser("txt2img").parse_args(sd_args))
    assert job.memory.peak < 8 * 2**30 and (job.request.height, job.request.width) == (512, 512)


def test_the_plan_counts_the_runs_controlnets(sd_args, tmp_path, monkeypatch):
    free_memory(monkeypatch, 24 * 2**30)
    Image.new("RGB", (8, 8)).save(tmp_path / "hint.png")
    control = ["--control_model", str(tmp_path / "control.pth"), "--control_image", str(tmp_path / "hint.png")]
    parse = cli.build_parser("txt2img").parse_args
    plain, controlled = (cli.plan("txt2img", parse([*sd_args, *extra])).memory for extra in ([], control))
    assert plain.control == 0 < controlled.control


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", " BREAK ".join(["a"] * 6501), "--n_samples", "1"], "the cross-attention to the prompt .*BREAK"),
        (["--H", "2048", "--W", "2048"], r"the VAE decoder .*add --vae_tiling, or lower --H/--W or --n_samples\."),
        (["--H", "4096", "--W", "4096", "--vae_tiling", "--n_samples", "1"], r"the UNet .*lower --H/--W"),
    ],
)
def test_stable_diffusion_jobs_that_do_not_fit_name_what_to_lower(sd_args, capsys, monkeypatch, extra, message):
    free_memory(monkeypatch, 24 * 2**30)
    never_load(monkeypatch)
    code, err = run_main("txt2img", [*sd_args, *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err


def test_n_iter_batches_are_made_as_the_run_reaches_them(tiny_files, tmp_path):
    args = tiny_args(tiny_files, "--n_iter", "1000000000", "--skip_grid", "--seed", "5", "--outdir", str(tmp_path))
    job = cli.plan("txt2img", cli.build_parser("txt2img").parse_args(args))
    assert job.n_iter == 10**9 and job.batches == [["a painting of a virus monster playing guitar"] * 3]
    batches = job.seeded_batches()
    assert [next(batches)[1], next(batches)[1]] == [[5, 6, 7], [8, 9, 10]]
    fixed = cli.plan("txt2img", cli.build_parser("txt2img").parse_args([*args, "--fixed_code"])).seeded_batches()
    assert [next(fixed)[1], next(fixed)[1]] == [[5, 6, 7], [5, 6, 7]]


def write_black_png(path: Path, width: int, height: int) -> None:
    """A black RGB PNG, compressed row by row so that its decoded size is never held in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, body = zlib.compressobj(9), bytes(1 + 3 * width), bytearray()
    for _ in range(height):
        body += compressor.compress(row)
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(body)) + chunk(b"IEND", b""))


def test_an_init_image_too_large_to_process_is_refused_before_it_is_decoded(tiny_files, tmp_path, capsys,
                                                                           monkeypatch, recwarn):  # fmt: skip
    big = tmp_path / "big.png"
    write_black_png(big, 12000, 12000)  # 144M pixels: below PIL's decompression-bomb error (179M)
    free_memory(monkeypatch, 16 * 2**30)
    never_load(monkeypatch)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the image was decoded"))
    args = tiny_args(tiny_files, "--init-img", str(big), "--n_samples", "1", "--outdir", str(tmp_path / "out"))
    code, err = run_main("img2img", args, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: out of memory: this run needs about") and "lower --H/--W" in err
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_memory_is_checked_again_once_the_weights_are_loaded(tiny_files, tmp_path, capsys, monkeypatch):
    free_memory(monkeypatch, 16 * 2**30, 2**20)
    out = tmp_path / "out"
    code, err = run_main("txt2img", tiny_args(tiny_files, "--H", "16", "--W", "16", "--outdir", str(out)), capsys)
    assert code == 2 and err.startswith("error: out of memory: this run needs about") and "but 0.0 GiB is" in err
    assert not out.exists()


def last_error(stderr: str) -> str:
    """The error line of a run that failed mid-way (notes and the progress bar come first); it must be the only one."""
    assert stderr.count("error: ") == 1 and stderr.endswith("\n"), stderr
    return stderr.splitlines()[-1]


def replace_call(monkeypatch, owner, name: str, call: int, replacement) -> None:
    """Send the ``call``-th call (1-based) of ``owner.name`` to ``replacement``; the others work as before."""
    original, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return (replacement if len(calls) == call else original)(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def raising(error: BaseException):
    def raise_it(*args, **kwargs):
        raise error

    return raise_it


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
        MemoryError(),
    ],
    ids=["cuda", "cpu", "python"],
)
def test_running_out_of_memory_mid_run_is_one_line_naming_the_files_written(tiny_files, tmp_path, capsys,
                                                                           monkeypatch, error):  # fmt: skip
    replace_call(monkeypatch, cli.Pipeline, "run", 3, raising(error))
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--H", "16", "--W", "16", "--n_samples", "1", "--n_iter", "3", "--outdir", str(out))
    code = cli.main("txt2img", args)
    captured = capsys.readouterr()
    error = last_error(captured.err)
    assert code == 2 and error.startswith("error: out of memory; lower --n_samples or --H/--W")
    written = [str(out / "samples" / "00000.png"), str(out / "samples" / "00001.png")]
    assert error.endswith(f" 2 files had been written: {', '.join(written)}.")
    assert captured.out.splitlines() == [f"wrote {path}" for path in written]
    assert sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"] and not list(out.glob("grid-*"))


@pytest.mark.parametrize("kind", [RuntimeError, ValueError])
def test_a_bug_mid_run_is_not_dressed_up_as_bad_input(kind, tiny_files, tmp_path, monkeypatch):
    # Only UserError (and OSError) is bad input: an internal ValueError is a bug and keeps its traceback.
    bug = kind("mat1 and mat2 shapes cannot be multiplied")
    replace_call(monkeypatch, cli.Pipeline, "run", 1, raising(bug))
    with pytest.raises(kind, match="shapes cannot be multiplied"):
        cli.main("txt2img", tiny_args(tiny_files, "--H", "16", "--W", "16", "--outdir", str(tmp_path / "out")))


def test_a_full_disk_mid_run_says_so_and_lists_the_samples_written(tiny_files, tmp_path, capsys, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n")  # a partial file, as a write that runs out of space leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    replace_call(monkeypatch, Image.Image, "save", 3, full_disk)
    out = tmp_path / "out"
    args = tiny_args(tiny_files, "--H", "16", "--W", "16", "--n_samples", "1", "--n_iter", "4", "--outdir", str(out))
    code = cli.main("txt2img", args)
    error = last_error(capsys.readouterr().err)
    assert code == 2 and error.startswith("error: the disk is full (No space left on device); free some space or")
    samples = out / "samples"
    assert error.endswith(f"2 files had been written: {samples / '00000.png'}, {samples / '00001.png'}.")
    assert sorted(os.listdir(out / "samples")) == ["00000.png", "00001.png"], "no partial file, not even hidden"


def test_warnings_are_one_line_each(tiny_files, tmp_path, capsys):
    args = tiny_args(tiny_files, "--prompt", "a (red:1000) circle", "--n_samples", "1", "--n_iter", "1", "--H", "16",
                     "--W", "16", "--skip_save", "--skip_grid", "--outdir", str(tmp_path / "out"))  # fmt: skip
    code, err = run_main("txt2img", args, capsys)
    lines = [line for line in err.splitlines() if "prompt weights" in line]
    assert code == 0 and lines == [
        "warning: prompt weights are limited to [-10, 10]: the brackets around 'red' ask for 1000; clamped to 10."
    ]
    assert "UserWarning" not in err


@pytest.mark.parametrize(
    "config, side",
    [("configs/stable-diffusion/v2-inference-v.yaml", 768), ("models/ldm/shapes/config.yaml", 64)],
)
def test_txt2img_defaults_to_the_size_the_model_was_trained_at(tmp_path, config, side):
    (tmp_path / "model.ckpt").write_bytes(b"")
    args = ["--config", str(ROOT / config), "--ckpt", str(tmp_path / "model.ckpt"), "--device", "cpu",
            "--n_samples", "1"]  # fmt: skip
    job = cli.plan("txt2img", cli.build_parser("txt2img").parse_args(args))
    assert (job.request.height, job.request.width) == (side, side)
    job = cli.plan("txt2img", cli.build_parser("txt2img").parse_args([*args, "--H", "128"]))
    assert (job.request.height, job.request.width) == (128, side)
