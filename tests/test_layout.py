"""Layout conditioning (ldm/data/layout.py): objects <-> the token sequences of LDM's layout-to-image model."""

import random

import pytest
import torch
from ldm_family import IMAGE, LAYOUT_OBJECTS, LAYOUT_TOKENS, MODELS, tiny_model

from ldm.data.layout import LayoutObject, ObjectsBoundingBoxConditionalBuilder, builder_for_cond_stage
from ldm.errors import UserError
from ldm.util import load_config

OBJECTS = [
    LayoutObject(5, (0.1, 0.2, 0.3, 0.4)),
    LayoutObject(17, (0.5, 0.0, 0.5, 0.5), is_group_of=True),
    LayoutObject(0, (0.0, 0.6, 1.0, 0.4)),
]


def openimages_builder(**kwargs) -> ObjectsBoundingBoxConditionalBuilder:
    return ObjectsBoundingBoxConditionalBuilder(no_object_classes=601, **kwargs)


def test_sequence_length_is_the_layout_models_max_seq_len():
    params = load_config(MODELS / "layout2img-openimages256" / "config.yaml").model.params.cond_stage_config.params
    builder = openimages_builder(no_tokens=params.vocab_size)
    tokens = builder.build(OBJECTS)
    assert builder.embedding_dim == params.max_seq_len == 92
    assert tokens.shape == (92,) and tokens.dtype == torch.long
    assert int(tokens.max()) < params.vocab_size


def test_round_trip_objects_tokens_objects_within_half_a_grid_cell():
    builder = openimages_builder()
    objects, crop = builder.inverse_build(builder.build(OBJECTS))
    assert crop == (0.0, 0.0, 1.0, 1.0)
    assert [(o.category, o.is_group_of) for o in objects] == [(5, False), (17, True), (0, False)]
    cell = 1 / (builder.no_sections - 1)  # 90 sections a side for 8192 tokens
    for got, wanted in zip(objects, OBJECTS, strict=True):
        # Each corner is within half a cell; a width or height within a cell.
        assert max(abs(g - w) for g, w in zip(got.bbox[:2], wanted.bbox[:2], strict=True)) <= cell / 2 + 1e-9
        assert max(abs(g - w) for g, w in zip(got.bbox[2:], wanted.bbox[2:], strict=True)) <= cell + 1e-9
    # Tokens of the decoded objects are the same tokens: the grid points are fixed points.
    assert torch.equal(builder.build(objects), builder.build(OBJECTS))


def test_token_layout_triples_grid_corners_padding_and_crop():
    builder = ObjectsBoundingBoxConditionalBuilder(no_object_classes=10, no_max_objects=3, no_tokens=17)
    # 17 tokens: a 4x4 grid, (x, y) -> round(3y) * 4 + round(3x), and the no-object token 16. Per object: category,
    # top-left, bottom-right; then the empty third object; then the crop (the whole image).
    tokens = builder.build([LayoutObject(2, (0.0, 0.0, 1.0, 1.0)), LayoutObject(7, (1 / 3, 1 / 3, 1 / 3, 2 / 3))])
    assert tokens.tolist() == [2, 0, 15, 7, 5, 14, 16, 16, 16, 0, 15]


def test_flags_extend_the_category_by_multiples_of_the_class_count():
    builder = openimages_builder(use_additional_parameters=True, no_tokens=16384)
    obj = LayoutObject(3, (0.0, 0.0, 0.5, 0.5), is_group_of=True, is_depiction=True)
    assert builder.object_representation(obj) == 3 + 601 * (1 | 4)
    assert builder.inverse_build(builder.build([obj]))[0][0].is_depiction
    plain = openimages_builder(use_group_parameter=False)
    assert plain.object_representation(obj) == 3


def test_crop_and_flip_follow_the_image():
    builder = ObjectsBoundingBoxConditionalBuilder(
        no_object_classes=10, no_max_objects=2, no_tokens=121, encode_crop=False
    )
    # Relative to the crop (the right half), the box spans its left half; flipped, its right half.
    crop = (0.5, 0.0, 0.5, 1.0)
    inside, outside = LayoutObject(1, (0.5, 0.0, 0.25, 1.0)), LayoutObject(2, (0.0, 0.0, 0.2, 0.2))
    (got,), _ = builder.inverse_build(builder.build([inside, outside], crop_coordinates=crop))
    assert got.bbox == pytest.approx((0.0, 0.0, 0.5, 1.0))
    (flipped,), _ = builder.inverse_build(builder.build([inside], crop_coordinates=crop, horizontal_flip=True))
    assert flipped.bbox == pytest.approx((0.5, 0.0, 0.5, 1.0))
    with_crop = ObjectsBoundingBoxConditionalBuilder(no_object_classes=10, no_max_objects=2, no_tokens=121)
    assert with_crop.inverse_build(with_crop.build([inside], crop_coordinates=crop))[1] == pytest.approx(crop)


def test_extra_objects_are_dropped_and_a_seeded_shuffle_reorders():
    builder = ObjectsBoundingBoxConditionalBuilder(no_object_classes=50, no_max_objects=2, no_tokens=256)
    many = [LayoutObject(i, (0.1, 0.1, 0.2, 0.2)) for i in range(5)]
    assert [o.category for o in builder.inverse_build(builder.build(many))[0]] == [0, 1]
    orders = {tuple(builder.build(OBJECTS[:2], rng=random.Random(seed)).tolist()) for seed in range(10)}
    assert len(orders) == 2


def test_bad_layouts_are_user_errors():
    builder = ObjectsBoundingBoxConditionalBuilder(no_object_classes=10, no_max_objects=2, no_tokens=16)
    with pytest.raises(UserError, match="category 10"):
        builder.build([LayoutObject(10, (0.0, 0.0, 0.5, 0.5))])
    with pytest.raises(UserError, match="past the vocabulary"):
        builder.build([LayoutObject(9, (0.0, 0.0, 0.5, 0.5), is_group_of=True)])
    with pytest.raises(UserError, match="8 tokens"):
        builder.inverse_build([0, 1, 2])


def test_plot_draws_each_box_in_its_colour_on_white():
    builder = ObjectsBoundingBoxConditionalBuilder(no_object_classes=10, no_max_objects=2, no_tokens=121)
    image = builder.plot(builder.build([LayoutObject(1, (0.5, 0.5, 0.4, 0.4))]), figure_size=(100, 80))
    assert image.shape == (3, 80, 100) and image.min() >= -1 and image.max() <= 1
    pixels = ((image + 1) * 127.5).round().to(torch.uint8)
    assert pixels[:, 10, 10].tolist() == [255, 255, 255]  # background
    assert pixels[:, 60, 51].tolist() == [31, 119, 180]  # the first object's left edge, tab10 blue
    assert pixels[:, 1, 50].tolist() == [63, 63, 63]  # the crop's (whole image's) outline


def test_tiny_layout_model_encodes_layouts_and_logs_them():
    model = tiny_model("layout2img-openimages256")
    builder = builder_for_cond_stage(model.cond_stage_model, no_object_classes=20)
    assert (builder.no_max_objects, builder.no_tokens, builder.embedding_dim) == (LAYOUT_OBJECTS, LAYOUT_TOKENS, 11)
    tokens = torch.stack([builder.build(OBJECTS[:2]), builder.build(OBJECTS[2:])])
    batch = {"image": torch.rand(2, IMAGE, IMAGE, 3) * 2 - 1, "coordinates_bbox": tokens}
    z, c = model.get_input(batch, "image")
    assert c.shape == (2, 11) and torch.equal(c, tokens)  # trainable cond stage: encoded in forward
    assert model.get_learned_conditioning(c).shape == (2, 11, 32)
    log = model.log_images(batch, N=2, ddim_steps=2)
    assert log["conditioning"].shape == log["inputs"].shape == (2, 3, IMAGE, IMAGE)
    assert log["samples"].shape == (2, 3, IMAGE, IMAGE)
