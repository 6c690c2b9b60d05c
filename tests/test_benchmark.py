"""scripts/benchmark.py on tiny models: the report's fields, bad input, and (with diffusers) the engine cross-check.

The comparison with diffusers needs ``requirements-bench.txt``, which CI does not install: those tests skip there.
"""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ldm.benchmark.run
from ldm import to_diffusers
from ldm.benchmark.comparison import EnginesDiffer, build_engine, check_tokenizers, check_unets
from ldm.benchmark.run import unet_inputs
from ldm.benchmark.settings import Settings
from ldm.benchmark.weights import random_weights

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models/ldm/shapes"
NO_DIFFUSERS = "diffusers is not installed (pip install -r requirements-compare.txt; make test installs it)"


@pytest.fixture(scope="module")
def tiny_config_file(tiny_config, tmp_path_factory) -> Path:
    """The tiny reference config with its text encoder override baked in, as a file."""
    path = tmp_path_factory.mktemp("benchmark") / "tiny.yaml"
    OmegaConf.save(tiny_config, path)
    return path


def tiny_args(config_file: Path, *extra: str) -> list[str]:
    return ["--config", str(config_file), "--device", "cpu", "--H", "32", "--W", "32", "--steps", "2", "--n", "2",
            *extra]  # fmt: skip


def test_ldm_only_report_without_diffusers(benchmark, tiny_config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ldm.benchmark.settings.diffusers_available", lambda: False)
    monkeypatch.setattr("ldm.benchmark.report.cpu_computes_bf16", lambda: False)
    out = tmp_path / "bench.json"
    assert benchmark.main(tiny_args(tiny_config_file, "--json", str(out))) == 0
    captured = capsys.readouterr()
    assert "pip install -r requirements-bench.txt" in captured.err
    assert "UNet forward, batch 2" in captured.out and "command: python scripts/benchmark.py" in captured.out
    assert "device cpu, no bf16 arithmetic" in captured.out  # bf16 timings there measure torch's emulation

    report = json.loads(out.read_text())
    assert report["command"].startswith("python scripts/benchmark.py --config")
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    assert report["machine"]["device"] == "cpu" and "diffusers" not in report["machine"]
    assert report["machine"]["cpu_computes_bf16"] is False
    assert report["model"]["weights"] == "random (seed 42)"
    assert report["settings"]["steps"] == 2 and report["settings"]["dtype"] == "fp32"
    results = report["results"]
    for timing in ("unet_forward_s", "txt2img_s"):
        assert results[timing]["ldm"] > 0 and len(results[timing]["runs"]["ldm"]) == 2
        assert "diffusers" not in results[timing] and "ratio" not in results[timing]
    assert results["peak_memory_bytes"]["ldm"] > 100 * 2**20  # torch alone is more than that
    assert report["checks"] == {}


def test_random_weights_leave_no_layer_at_zero(tiny_config):
    weights = random_weights(tiny_config, seed=1)
    # The UNet's output convolution starts at zero in the architecture (zero_module) ...
    assert weights["model.diffusion_model.out.2.weight"].abs().max() > 0
    # ... and so do the ResBlocks' last convolutions and the transformers' proj_out: none is left at zero.
    zero = [key for key, value in weights.items() if value.dim() >= 2 and not value.any() and "model_ema" not in key]
    assert zero == []
    again, other = random_weights(tiny_config, seed=1), random_weights(tiny_config, seed=2)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(weights[key], again[key]) and not torch.equal(weights[key], other[key])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
        (["--dtype", "fp64"], "invalid choice"),
        (["--ckpt", "no-such.ckpt"], "checkpoint 'no-such.ckpt' does not exist"),
        (["--H", "30"], "height 30 is not a multiple of 4"),
        (["--steps", "0"], "--steps must be in 1..1000"),
        (["--n", "0"], "--n must be at least 1"),
        (["--attention_slicing", "0"], "attention slice size must be a positive integer"),
        (["--device", "tpu"], "unknown device"),
        (["--json", "no/such/dir/out.json"], "its folder does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(benchmark, tiny_config_file, capsys, extra, message):
    assert benchmark.main(tiny_args(tiny_config_file, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_fast_paths_reach_the_pipeline_only_when_asked():
    plain = Settings(device="cpu", dtype="fp32", height=32, width=32, steps=1, repeats=1, seed=0)
    assert plain.fast_path_options() == {}
    fast = Settings(**{**plain.__dict__, "channels_last": True, "attention_slicing": "auto"})
    assert fast.fast_path_options() == {"channels_last": True, "attention_slicing": "auto"}


# ---------------------------------------------------------------------------------------------------------------------
# With diffusers


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers", reason=NO_DIFFUSERS)


@pytest.mark.parametrize("model", ["tiny reference (num_heads)", "bundled demo (num_head_channels)"])
def test_diffusers_conversion_computes_the_same_unet(diffusers, tiny_dir, tiny_config, model):
    from ldm.util import load_config

    if model.startswith("tiny"):
        config, weights = tiny_config, tiny_dir / "model.safetensors"
    else:
        config, weights = load_config(DEMO / "config.yaml"), DEMO / "model.safetensors"
    settings = Settings(device="cpu", dtype="fp32", height=32, width=32, steps=1, repeats=1, seed=0)
    engines = {name: build_engine(name, config, weights, settings) for name in ("ldm", "diffusers")}
    inputs = unet_inputs(config, settings)
    checks = check_unets(engines, inputs, "fp32")
    assert checks["unet_max_abs_diff"] <= 1e-5 * checks["unet_max_abs_output"]
    check_tokenizers(engines)

    with torch.no_grad():  # one tensor converted wrongly must stop the benchmark
        engines["diffusers"].pipe.unet.conv_out.weight.mul_(1.01)
    with pytest.raises(EnginesDiffer, match="the UNets differ"):
        check_unets(engines, inputs, "fp32")


def test_tiny_comparison_reports_ratios(
    benchmark, diffusers, tiny_config_file, tiny_dir, tmp_path, monkeypatch, capsys
):
    measure = ldm.benchmark.run.measure_memory  # ldm's own memory process: test_ldm_only_report_without_diffusers
    monkeypatch.setattr("ldm.benchmark.run.measure_memory", lambda engine, *args: measure(engine, *args)
                        if engine == "diffusers" else {"process": 1, "txt2img": 1})  # fmt: skip
    out = tmp_path / "bench.json"
    args = tiny_args(tiny_config_file, "--ckpt", str(tiny_dir / "model.safetensors"), "--json", str(out))
    assert benchmark.main(args) == 0
    assert "ldm/diffusers" in capsys.readouterr().out

    report = json.loads(out.read_text())
    assert report["machine"]["diffusers"] == diffusers.__version__
    for measure in ("unet_forward_s", "txt2img_s", "peak_memory_bytes"):
        values = report["results"][measure]
        assert values["ldm"] > 0 and values["diffusers"] > 0
        assert values["ratio"] == pytest.approx(values["ldm"] / values["diffusers"])
    checks = report["checks"]
    assert checks["unet_max_abs_diff"] <= 1e-5 * checks["unet_max_abs_output"]
    # Same weights, same start noise, same DDIM: the same image, up to rounding.
    assert checks["image_mean_abs_diff"] < 0.5


def test_sd15_architecture_converts_tensor_for_tensor(benchmark, diffusers):
    """The default benchmark model, on the meta device (no memory, no weights): diffusers' converters and our head
    counts give models that take every tensor of our UNet and VAE, and nothing else."""
    from ldm.util import count_params, instantiate_from_config, load_config

    config = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    unet, vae = to_diffusers.unet_and_vae(config, model.state_dict())
    assert count_params(unet) == count_params(model.model.diffusion_model)
    assert count_params(vae) == count_params(model.first_stage_model)
    assert unet.config.attention_head_dim == 8 and unet.config.cross_attention_dim == 768
