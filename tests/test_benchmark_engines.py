"""scripts/benchmark.py with --engines, --sizes, --batches and --plot: the engines' checks, ratios between every
pair, the cost-growth tables and the plot, on the bundled demo model; and the refusals before anything is loaded."""

import json
from pathlib import Path

import pytest
from PIL import Image

import ldm.benchmark.run
from ldm.benchmark.report import summary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models/ldm/shapes"


def demo_args(*extra: str) -> list[str]:
    return ["--config", str(DEMO / "config.yaml"), "--ckpt", str(DEMO / "model.safetensors"), "--device", "cpu",
            "--H", "32", "--W", "32", "--steps", "1", "--n", "1", *extra]  # fmt: skip


def test_summary_gives_the_ratio_of_every_pair():
    values = summary({"ldm": [2.0, 4.0], "ldm-openvino": 1.0, "diffusers": 3.0})
    assert values["ldm"] == 3.0 and values["ratios"]["ldm-openvino/ldm"] == pytest.approx(1 / 3)
    assert values["ratio"] == 1.0 and values["ratios"]["diffusers/ldm-openvino"] == 3.0
    assert len(values["ratios"]) == 6 and values["runs"]["ldm"] == [2.0, 4.0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engines", "ldm,onnx"], "unknown engine onnx; choose from ldm,ldm-openvino,diffusers"),
        (["--sizes", "256,x"], "expected comma-separated whole numbers"),
        (["--batches", "0"], "expected positive numbers"),
        (["--plot", "plot.png"], "give --sizes too"),
        (["--sizes", "40"], "height 40 is not a multiple of 16"),
        (["--engines", "ldm", "--sizes", "32", "--plot", "no/such/dir/plot.png"], "its folder does not exist"),
    ],
)
def test_bad_engine_options_are_one_line_and_exit_2(benchmark, capsys, extra, message):
    assert benchmark.main(demo_args(*extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_engine_whose_package_is_missing_is_refused_with_its_install_command(benchmark, monkeypatch, capsys):
    monkeypatch.setattr("ldm.benchmark.settings.installed", lambda module: False)
    assert benchmark.main(demo_args("--engines", "ldm,ldm-openvino")) == 2
    assert "need OpenVINO: pip install -r requirements-openvino.txt" in capsys.readouterr().err


@pytest.mark.openvino
def test_the_openvino_engine_is_checked_and_compared_with_every_other(benchmark, tmp_path, monkeypatch, capsys):
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install -r requirements-openvino.txt")
    monkeypatch.setenv("LDM_OPENVINO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("ldm.benchmark.settings.installed", lambda module: module != "stable_diffusion_cpp")
    measure = ldm.benchmark.run.measure_memory  # ldm's own memory process is tested in tests/test_benchmark.py
    monkeypatch.setattr("ldm.benchmark.run.measure_memory", lambda engine, *args: measure(engine, *args)
                        if engine == "ldm-openvino" else {"process": 1, "txt2img": 1})  # fmt: skip
    out = tmp_path / "bench.json"
    assert benchmark.main(demo_args("--engines", "ldm,ldm-openvino,sdcpp", "--json", str(out))) == 0
    captured = capsys.readouterr()
    assert "sdcpp is left out (pip install stable-diffusion-cpp-python" in captured.err
    assert "UNet forward (row / column)" in captured.out and "ldm-openvino" in captured.out
    report = json.loads(out.read_text())
    results, checks = report["results"], report["checks"]
    assert report["machine"]["openvino"] and "sdcpp" not in results["txt2img_s"]
    assert set(results["txt2img_s"]["ratios"]) == {"ldm/ldm-openvino", "ldm-openvino/ldm"}
    assert results["peak_memory_bytes"]["ldm-openvino"] > 0
    assert checks["unet_max_abs_diff_by_engine"]["ldm-openvino"] <= 1e-4 * checks["unet_max_abs_output"]
    assert checks["image_mean_abs_diff_by_engine"]["ldm-openvino"] < 0.5


def test_cost_growth_tables_and_the_plot(benchmark, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "plot.png"
    growth_options = ["--sizes", "32,48", "--batches", "1,2", "--plot", str(plot)]
    args = demo_args("--engines", "ldm", *growth_options, "--skip-memory", "--json", str(out))
    assert benchmark.main(args) == 0
    printed = capsys.readouterr().out
    assert "cost growth with size" in printed and "cost growth with batch" in printed and "48x48" in printed
    assert "memory not measured" in printed and "peak memory" not in printed
    results = json.loads(out.read_text())["results"]
    assert "peak_memory_bytes" not in results
    growth = results["growth"]
    assert set(growth["size"]) == {"32", "48"} and set(growth["batch"]) == {"1", "2"}
    assert all(growth["size"][size]["txt2img_s"]["ldm"] > 0 for size in ("32", "48"))
    assert growth["batch"]["2"]["unet_step_s"]["ldm"] > 0
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (760, 480)
        assert (0x1F, 0x77, 0xB4) in {colour for _, colour in image.getcolors(maxcolors=1 << 16)}  # ldm's line
