"""DreamBooth prior preservation (ldm/data/prior.py and the loss in training.py): pairs in one bucket, batches of
instances then classes, and the loss = instance mean + prior_loss_weight * class mean, checked by hand."""

import pytest
import torch
from test_captions import write_image
from test_latent_cache import CONFIG, CountingEncoder

from ldm.data.base import DataModuleFromConfig
from ldm.data.latent_cache import LATENT_KEY
from ldm.data.prior import CLASS_KEY, PriorPreservation
from ldm.errors import UserError
from ldm.models.diffusion.training import prior_preservation_loss
from ldm.util import instantiate_from_config, load_config

BUCKETS = {"resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256}


def folders(tmp_path, n_class: int = 3):
    """Instance images (one wide, one tall) in ``2_sks dog``; ``n_class`` square class images."""
    instance = tmp_path / "instance"
    write_image(instance / "2_sks dog" / "wide.png", (220, 100), 1)
    write_image(instance / "2_sks dog" / "tall.png", (100, 220), 2)
    for i in range(n_class):
        write_image(tmp_path / "class" / f"{i}.png", (150, 150), 10 + i)
    return instance, tmp_path / "class"


def test_pairs_share_the_instance_bucket(tmp_path):
    instance, classes = folders(tmp_path)
    data = PriorPreservation({"root": str(instance), **BUCKETS}, classes, "a photo of a dog")
    assert len(data) == 4  # max(2 images x 2 repeats, 3 class images)
    for index in range(len(data)):
        mine, theirs = data[index]
        assert mine["jpg"].shape == theirs["jpg"].shape
        assert mine["txt"] == "sks dog" and theirs["txt"] == "a photo of a dog"
    assert sorted(set(data.bucket_keys())) == [(64, 192), (192, 64)]
    batch = data.collate([data[0], data[1]])  # both repeats of the tall image
    assert batch["jpg"].shape[0] == 4 and batch[CLASS_KEY].tolist() == [False, False, True, True]
    assert batch["txt"] == ["sks dog", "sks dog", "a photo of a dog", "a photo of a dog"]


def test_datamodule_batches_hold_both_halves(tmp_path):
    instance, classes = folders(tmp_path)
    params = {"instance": {"root": str(instance), **BUCKETS}, "class_data_root": str(classes), "class_prompt": "dog"}
    data = DataModuleFromConfig(
        2, num_workers=0, train={"target": "ldm.data.prior.PriorPreservation", "params": params}
    )
    batches = list(data.loader("train"))
    assert sum(int((~b[CLASS_KEY]).sum()) for b in batches) == 4
    for batch in batches:
        assert int(batch[CLASS_KEY].sum()) * 2 == len(batch[CLASS_KEY])


def test_class_latents_are_cached_per_bucket(tmp_path):
    instance, classes = folders(tmp_path, n_class=1)
    data = PriorPreservation({"root": str(instance), "cache_latents": True, **BUCKETS}, classes, "dog")
    encoder = CountingEncoder()
    # 2 instance images, and the one class image in both of their buckets.
    assert data.prepare_latents(encoder, "vae") == 4 and encoder.images == 4
    mine, theirs = data[0]
    assert mine[LATENT_KEY].shape == theirs[LATENT_KEY].shape
    assert data.prepare_latents(encoder, "vae") == 0


def test_too_few_class_images_wait_for_generation(tmp_path):
    instance, classes = folders(tmp_path, n_class=2)
    data = PriorPreservation({"root": str(instance), **BUCKETS}, classes, "dog", num_class_images=5)
    assert data.missing_class_images == 3 and len(data) == 5  # made when training starts (test_lora_prior.py)
    with pytest.raises(UserError, match="lacks 3 class images"):
        data.prepare_latents(CountingEncoder(), "vae")
    data = PriorPreservation({"root": str(instance), **BUCKETS}, classes, "dog", num_class_images=1)
    assert len(data.classes.records) == 1


def test_weighted_sum_of_means():
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    mask = torch.tensor([False, False, True, True, True])
    log = {}
    loss = prior_preservation_loss(losses, mask, 0.5, log, "train")
    assert float(loss) == pytest.approx(2.0 + 0.5 * 20.0)
    assert float(log["train/loss_instance"]) == 2.0 and float(log["train/loss_prior"]) == 20.0
    assert float(prior_preservation_loss(losses, None, 0.5, {}, "train")) == pytest.approx(64 / 5)
    only_class = prior_preservation_loss(losses[2:], mask[2:], 0.5, {}, "train")
    assert float(only_class) == pytest.approx(10.0)


def test_model_loss_is_the_hand_computed_weighted_sum():
    """On the tiny LDM with fixed timesteps and noise: the loss of a prior-preservation batch is
    mean(instance errors) + prior_loss_weight * mean(class errors), each error the mean squared eps error."""
    config = load_config(CONFIG, ["model.params.scale_by_std=false", "model.params.prior_loss_weight=0.25"])
    torch.manual_seed(0)
    model = instantiate_from_config(config.model).eval()
    images = torch.rand(4, 32, 64, 3) * 2 - 1
    batch = {"jpg": images, "txt": ["sks dog"] * 2 + ["a dog"] * 2, CLASS_KEY: torch.tensor([False, False, True, True])}
    with torch.no_grad():
        torch.manual_seed(1)
        z, c = model.get_input(batch, "jpg")
        c = model.get_learned_conditioning(c)
        t = torch.tensor([10, 500, 200, 900])
        noise = torch.randn_like(z)
        loss, log = model.p_losses(z, c, t, noise, class_mask=batch[CLASS_KEY])
        prediction = model.apply_model(model.q_sample(z, t, noise), t, c)
    errors = (prediction - model.training_target(z, noise, t)).pow(2).mean(dim=(1, 2, 3))
    expected = errors[:2].mean() + 0.25 * errors[2:].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(log["val/loss_prior"], errors[2:].mean())
    # Through shared_step the batch's CLASS_KEY reaches the loss.
    torch.manual_seed(2)
    with torch.no_grad():
        weighted, log = model.shared_step(batch)
    assert "val/loss_prior" in log and "val/loss_instance" in log
