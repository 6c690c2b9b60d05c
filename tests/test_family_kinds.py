"""Each kind of CompVis's pretrained LDM family samples with DDIM and a k-diffusion sampler and trains, on tiny
versions of ``models/ldm/<name>/config.yaml`` (see ``tests/ldm_family.py``).

The image-conditioned kinds' sampling (super-resolution, semantic synthesis, inpainting_big) is in
``test_conditioning_keys.py``; the runs through ``main.py`` are in ``test_training_kinds.py``.
"""

import pytest
import torch

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from tests.ldm_family import IMAGE, LATENT, LAYOUT_OBJECTS, LAYOUT_TOKENS, tiny_model

B = 2


def class_labels(model) -> dict:
    return {"class_label": torch.tensor([1, 7])}


def layout_tokens(model) -> torch.Tensor:
    """(B, 3 objects * 3 + 2 crop tokens) of random layouts."""
    return torch.randint(0, LAYOUT_TOKENS - 1, (B, 3 * LAYOUT_OBJECTS + 2), generator=torch.Generator().manual_seed(1))


# name -> the cond stage's input for B images (None: an unconditional model)
SAMPLED = {
    "celeba256": None,  # unconditional, VQ first stage
    "lsun_churches256": None,  # unconditional, KL first stage
    "cin256": class_labels,
    "layout2img-openimages256": layout_tokens,
}


@pytest.mark.parametrize("sampler", ["ddim", "Euler a"])
@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_each_kind_samples(name, sampler):
    model = tiny_model(name)
    make = SAMPLED[name]
    with torch.no_grad():
        cond = model.get_learned_conditioning(make(model)) if make is not None else None

        def draw(c):
            shape = (B, model.channels, LATENT, LATENT)
            return sample(model, sampler, 3, c, shape=shape, noise=Noise([0, 1]), progress=False)

        z = draw(cond)
        assert z.shape == (B, model.channels, LATENT, LATENT) and torch.isfinite(z).all()
        assert torch.equal(z, draw(cond)), "seeded"
        if cond is not None:
            assert not torch.allclose(z, draw(torch.zeros_like(cond))), "the conditioning reaches the UNet"
        assert model.decode_first_stage(z).shape == (B, 3, IMAGE, IMAGE)


def batch_of(name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, IMAGE, IMAGE, 3, generator=g) * 2 - 1  # HWC in [-1, 1], as the datasets give them
    batch = {"image": images, "class_label": torch.tensor([1, 7])}
    if name == "layout2img-openimages256":
        batch["coordinates_bbox"] = layout_tokens(None)
    if name == "semantic_synthesis256":
        classes = torch.randint(0, 182, (B, IMAGE, IMAGE), generator=g)
        batch["segmentation"] = torch.nn.functional.one_hot(classes, 182).float()
    if name == "bsr_sr":
        batch["LR_image"] = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    return batch


@pytest.mark.parametrize(
    "name", ["celeba256", "lsun_churches256", "cin256", "layout2img-openimages256", "semantic_synthesis256", "bsr_sr"]
)
def test_each_kind_trains(name):
    model = tiny_model(name).train()
    batch = batch_of(name)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same timesteps and noise each step: the loss then falls as the model fits them
        loss, _ = model.shared_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert not any(p.requires_grad for p in model.first_stage_model.parameters()), "the first stage stays frozen"
