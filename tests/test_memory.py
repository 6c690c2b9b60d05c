"""ldm.memory: the activation estimate from a config and prompt chunk counts; ldm.devices: free memory and
allocation failures."""

from pathlib import Path

import pytest
import torch

from ldm import devices
from ldm.devices import GIB, available_memory, gib, is_out_of_memory
from ldm.memory import Footprint, estimate, min_chunks, with_refiner
from ldm.util import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
V1 = load_config(ROOT / "configs/stable-diffusion/v1-inference.yaml")


def test_the_footprint_reads_the_widths_of_stable_diffusion():
    assert Footprint.from_config(V1) == Footprint(
        factor=8,
        latent_channels=4,
        unet_width=320,
        attention_width=1280,
        context_dim=768,
        vae_width=128,
        vae_upsampled=256,
        chunk_length=77,
        # The skip widths over the latent area: conv_in, 2 x 320 + downsampler (/4), 2 x 640 + downsampler (/16),
        # 2 x 1280 + downsampler (/64), 2 x 1280 (/64) and the middle block's 1280 (/64).
        residual_width=320 + 640 + 320 / 4 + 1280 / 4 + 640 / 16 + 2560 / 16 + 1280 / 64 + 2560 / 64 + 1280 / 64,
    )


def test_a_bad_width_in_the_config_is_a_config_error_naming_it():
    config = load_config(
        ROOT / "configs/stable-diffusion/v1-inference.yaml", ["model.params.unet_config.params.model_channels=x"]
    )
    with pytest.raises(ConfigError, match="model.params.unet_config.params.model_channels must be a positive integer"):
        Footprint.from_config(config)


def test_sd_at_512_in_batches_of_3_fits_a_24_gib_cpu_with_room_to_spare():
    memory = estimate(Footprint.from_config(V1), batch=3, height=512, width=512, kept_images=6)
    # Measured: the VAE decoder peaks at ~1 GiB an image in float32 on the CPU, the UNet step at ~0.4 GiB.
    assert 2 * GIB < memory.peak < 6 * GIB
    assert memory.largest == "decoder"


def test_the_estimate_grows_with_the_batch_and_the_area_and_tiling_bounds_the_decoder():
    footprint = Footprint.from_config(V1)
    small = estimate(footprint, batch=1, height=512, width=512)
    assert estimate(footprint, batch=2, height=512, width=512).unet == pytest.approx(2 * small.unet)
    assert estimate(footprint, batch=1, height=1024, width=1024).decoder == pytest.approx(4 * small.decoder, rel=0.01)
    huge = estimate(footprint, batch=1, height=8192, width=8192)
    tiled = estimate(footprint, batch=1, height=8192, width=8192, vae_tiling=True)
    assert huge.peak > 100 * GIB and tiled.decoder < huge.decoder / 20
    assert tiled.largest == "unet" and tiled.unet > 50 * GIB, "tiling does not make an 8192x8192 UNet step fit"
    assert estimate(footprint, batch=1, height=512, width=512, half=True).unet < small.unet


def test_long_prompts_cost_cross_attention_and_context():
    footprint = Footprint.from_config(V1)
    one = estimate(footprint, batch=1, height=512, width=512, chunks=1)
    many = estimate(footprint, batch=1, height=512, width=512, chunks=6501)
    assert one.attention < 0.1 * GIB and many.attention > 15 * GIB and many.context > 5 * GIB
    assert many.largest == "attention"


def test_a_refined_run_counts_both_prompt_embeddings_and_the_wider_unet():
    sizes = {"batch": 1, "height": 1024, "width": 1024, "half": True}
    base, refiner = (
        estimate(
            Footprint.from_config(load_config(ROOT / f"configs/stable-diffusion/sdxl-{kind}-inference.yaml")), **sizes
        )
        for kind in ("base", "refiner")
    )
    both = with_refiner(base, refiner)
    assert refiner.unet > base.unet, "the refiner's UNet is the wider one (384 channels against 320)"
    assert both.unet == refiner.unet and both.context == base.context + refiner.context
    assert both.decoder == base.decoder and both.peak > base.peak


def test_controlnets_add_their_residuals_once_and_a_control_image_each():
    footprint = Footprint.from_config(V1)
    sizes = {"batch": 2, "height": 512, "width": 512}
    plain = estimate(footprint, **sizes)
    one, three = (estimate(footprint, **sizes, controlnets=n) for n in (1, 3))
    assert plain.control == 0 and plain.peak == one.peak, "at 512 px the VAE decoder needs more than a step"
    tiled = {"batch": 1, "height": 2048, "width": 2048, "vae_tiling": True}
    assert estimate(footprint, **tiled).peak < estimate(footprint, **tiled, controlnets=1).peak
    residuals = 4 * 2 * 2 * 1640 * 64 * 64  # float32, cond + uncond of 2 images, R = 1640 a latent pixel
    hint = 4 * 2 * 2 * 3 * 512 * 512
    assert one.control == residuals + hint and three.control == residuals + 3 * hint
    # Of the order of the UNet's input half's skips: a tenth of the step, not a second UNet.
    assert 0.1 * one.unet < one.control < 0.2 * one.unet
    assert estimate(footprint, **sizes, controlnets=1, half=True).control == residuals // 2 + hint


def test_img2img_counts_the_encoder_and_a_grid_counts_every_kept_image():
    footprint = Footprint.from_config(V1)
    assert estimate(footprint, batch=1, height=512, width=512).encoder == 0
    assert estimate(footprint, batch=1, height=11968, width=11968, encode=True).encoder > 400 * GIB
    grid = estimate(footprint, batch=3, height=512, width=512, kept_images=3 * 10**9)
    assert grid.largest == "grid" and grid.grid > 10**6 * GIB


@pytest.mark.parametrize(
    ("prompt", "chunks"),
    [
        ("", 1),
        ("a red circle", 1),
        ("a BREAK b", 2),
        ("a BREAK BREAK b", 3),
        (" BREAK ".join(["a"] * 6501), 6501),
        ("word " * 75, 1),
        ("word " * 76, 2),
        ("(word:1.2) " * 200, 3),
        ("((((((", 1),
    ],
)
def test_min_chunks_counts_breaks_and_words_without_a_tokenizer(prompt, chunks):
    assert min_chunks(prompt) == chunks


def test_available_memory_on_the_cpu_is_a_positive_number_on_linux():
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo here")
    assert available_memory(torch.device("cpu")) > 0
    assert available_memory(torch.device("meta")) is None


def test_a_containers_memory_limit_caps_the_available_memory(tmp_path, monkeypatch):
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo here")
    monkeypatch.setattr(devices, "CGROUP", tmp_path)
    (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GIB}\n")
    (tmp_path / "memory.stat").write_text(f"anon {2 * GIB}\ninactive_file {GIB // 2}\nactive_file 0\n")
    capped = available_memory(torch.device("cpu"))
    assert capped <= GIB + GIB // 2, "the limit less what is used, plus the cache the kernel can reclaim"
    (tmp_path / "memory.max").write_text("max\n")
    assert available_memory(torch.device("cpu")) > 0


def test_allocation_failures_are_recognised_and_bugs_are_not():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert is_out_of_memory(MemoryError())
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")
    assert is_out_of_memory(cpu)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_gib_formats_any_size():
    assert gib(3 * GIB // 2) == "1.5 GiB"
    assert gib(10**30) == "9.3e+20 GiB"
