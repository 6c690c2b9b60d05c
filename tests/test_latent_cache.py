"""Latent caching (ldm/data/latent_cache.py): hits, misses, stale and corrupt entries, the model reading cached
latents exactly as it would have encoded them, and LatentDiffusion on non-square buckets."""

from pathlib import Path

import pytest
import torch
from test_captions import mixed_folder, small, write_image

from ldm.data.latent_cache import (
    LATENT_KEY,
    MOMENTS_KEY,
    LatentCache,
    cached_first_stage,
    model_encoder,
    module_fingerprint,
)
from ldm.errors import UserError
from ldm.util import instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "latent-diffusion" / "shapes-tiny.yaml"


@pytest.fixture(scope="module")
def model():
    """The tiny shapes LDM (f = 2), untrained, with scale_factor 0.5 so that scaling shows."""
    config = load_config(CONFIG, ["model.params.scale_by_std=false", "model.params.scale_factor=0.5"])
    torch.manual_seed(0)
    return instantiate_from_config(config.model).eval()


class CountingEncoder:
    """A fake first stage: the image's per-pixel channel mean as a 1-channel "latent", counting the images."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return images.mean(dim=1, keepdim=True)


def entry_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_hit_miss_stale_and_corrupt(tmp_path):
    root = mixed_folder(tmp_path / "data")
    data = small(root, cache_latents=True)
    encoder = CountingEncoder()
    assert data.prepare_latents(encoder, "vae-1") == 4 and encoder.images == 4  # one entry per image, not per repeat
    files = entry_files(root / ".latent-cache")
    assert len(files) == 4
    assert data.prepare_latents(encoder, "vae-1") == 0 and encoder.images == 4  # all hits

    item = data[1]  # a.png in its 192x64 bucket: a (1, 64, 192) latent of the fake encoder
    assert set(item) == {LATENT_KEY, "txt"} and item[LATENT_KEY].shape == (1, 64, 192)

    # The image changed: its entry is stale and re-encoded; the others are hits.
    write_image(root / "3_sks dog" / "a.png", (220, 100), seed=99)
    assert data.prepare_latents(encoder, "vae-1") == 1
    # Another VAE (or dtype): every entry is stale.
    assert data.prepare_latents(encoder, "vae-2") == 4
    # Corrupt entries: truncated, or a flipped byte in the tensor data (the checksum catches it).
    files = entry_files(root / ".latent-cache")
    files[0].write_bytes(files[0].read_bytes()[:40])
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0xFF
    files[1].write_bytes(bytes(raw))
    files[2].write_bytes(b"")
    assert data.prepare_latents(encoder, "vae-2") == 3
    assert len(entry_files(root / ".latent-cache")) == 4
    assert sorted(p.name for p in (root / ".latent-cache").iterdir()) == [p.name for p in files]  # no temp files


def test_an_entry_broken_after_caching_is_an_error_not_used(tmp_path):
    root = mixed_folder(tmp_path / "data")
    data = small(root, cache_latents=True, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match="not cached yet"):
        data[0]
    data.prepare_latents(CountingEncoder(), "vae")
    for path in entry_files(tmp_path / "cache"):
        path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="changed or vanished after caching"):
        data[0]


def test_flips_are_cached_as_their_own_encodings(tmp_path):
    write_image(tmp_path / "x.png", (220, 100))
    data = small(tmp_path, cache_latents=True, flip_p=0.5, default_caption="x")
    encoder = CountingEncoder()
    assert data.prepare_latents(encoder, "vae") == 2
    torch.manual_seed(0)
    latents = [data[0][LATENT_KEY] for _ in range(20)]
    plain = [t for t in latents if torch.equal(t, latents[0])]
    other = [t for t in latents if not torch.equal(t, latents[0])]
    assert plain and other
    torch.testing.assert_close(other[0], plain[0].flip(-1))  # the fake encoder is per-pixel, so flips commute


def test_cached_moments_train_like_encoding(tmp_path, model):
    """The model's latents from a cached batch equal those from encoding its images, draw for draw."""
    write_image(tmp_path / "1_sks dog" / "wide.png", (300, 100))
    data = small(tmp_path, cache_latents=True)
    encode, encoder_id = model_encoder(model)
    data.prepare_latents(encode, encoder_id)
    cached = data[0]
    assert MOMENTS_KEY in cached and cached[MOMENTS_KEY].shape == (8, 32, 96)  # mean + logvar of 4 channels, f = 2
    data.cache = None
    plain = data[0]
    images = {"jpg": torch.from_numpy(plain["jpg"])[None], "txt": [plain["txt"]]}
    batch = {MOMENTS_KEY: cached[MOMENTS_KEY][None], "txt": [cached["txt"]]}
    torch.manual_seed(1)
    z_images, _ = model.get_input(images, "jpg", force_c_encode=True)
    torch.manual_seed(1)
    z_cached, _ = model.get_input(batch, "jpg", force_c_encode=True)
    assert z_cached.shape == (1, 4, 32, 96)
    torch.testing.assert_close(z_cached, z_images, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    torch.testing.assert_close(z_cached, 0.5 * cached_first_stage(batch).sample())  # scaled as the model scales


def test_cached_batches_log_decoded_inputs(model):
    moments = torch.randn(2, 8, 16, 32)
    batch = {MOMENTS_KEY: moments, "txt": ["a", "b"]}
    z, c, x, xrec = model.get_input(batch, "jpg", return_first_stage_outputs=True, force_c_encode=True)
    assert x.shape == xrec.shape == (2, 3, 32, 64)
    assert model._batch_size(batch) == 2


def test_fingerprint_follows_the_weights_and_dtype(model):
    vae = model.first_stage_model
    before = module_fingerprint(vae)
    _, encoder_id = model_encoder(model)
    assert encoder_id.startswith(before) and encoder_id.endswith("torch.float32")
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    try:
        assert module_fingerprint(vae) != before
    finally:
        with torch.no_grad():
            vae.encoder.conv_in.weight[0, 0, 0, 0] -= 1e-3


@pytest.mark.parametrize("size", [(64, 64), (192, 64), (64, 128)])
@torch.no_grad()
def test_model_trains_on_non_square_buckets(model, size):
    """shared_step on (B, H, W, 3) images of any multiple-of-64 size, and the same from cached moments."""
    width, height = size
    images = torch.rand(2, height, width, 3) * 2 - 1
    batch = {"jpg": images, "txt": ["a red circle", "a blue square"]}
    z, _ = model.get_input(batch, "jpg")
    assert z.shape == (2, 4, height // 2, width // 2)
    loss, log = model.shared_step(batch)
    assert loss.isfinite() and log["val/loss_simple"].isfinite()
    moments = model.encode_first_stage(images.permute(0, 3, 1, 2)).parameters
    loss, _ = model.shared_step({MOMENTS_KEY: moments, "txt": batch["txt"]})
    assert loss.isfinite()


def test_cache_paths_separate_placements(tmp_path):
    cache = LatentCache(tmp_path)
    write_image(tmp_path / "x.png", (64, 64))
    data = small(tmp_path, default_caption="x", cache_latents=True, cache_dir=tmp_path / "c")
    placements = data.cached_placements([(0, None), (0, (64, 192)), (0, (128, 128))])
    assert len({cache.path(p) for p in placements}) == len(placements) == 2  # (128, 128) is its own bucket
