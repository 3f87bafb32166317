"""The rendered shape scenes of attribute transfer's second embedding space (spec 001, issue 11): where the
objects go, what the pixels show, and the frozen CNN's embedding."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from datamodules.shape_scenes import (
    A_COLORS,
    B_COLORS,
    IMAGE_SIZE,
    FrozenConvFeatures,
    ShapeScene,
    default_embedder,
    object_positions,
    random_scene,
    render,
    sample_scenes,
)

SCENE = ShapeScene(a_blue=0, a_hollow=0, a_pair=0, left_of=1, b_yellow=1, a_shape="square", b_shape="disk",
                   a_size=5.0, b_size=5.0, gap=16.0, center=(0.0, 0.0), background=10, jitter=(0, 0, 0))


def test_layout_by_hand():
    assert object_positions(SCENE) == ([(16.0, 24.0)], (32.0, 24.0))  # A left of B, centred at 24
    above = replace(SCENE, left_of=0, center=(2.0, -1.0))
    assert object_positions(above) == ([(26.0, 15.0)], (26.0, 31.0))
    pair = replace(SCENE, a_pair=1)  # the pair stacks across the relation's axis, 1.15 sizes from A's place
    assert object_positions(pair) == ([(16.0, 24.0 - 5.75), (16.0, 24.0 + 5.75)], (32.0, 24.0))


def test_pixels_show_the_attributes():
    image = render(SCENE)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and image.dtype == np.uint8
    assert tuple(image[24, 16]) == A_COLORS[0] and tuple(image[24, 32]) == B_COLORS[1]
    assert tuple(image[2, 2]) == (10, 10, 10)
    blue_hollow = render(replace(SCENE, a_blue=1, a_hollow=1))
    assert tuple(blue_hollow[24, 16]) == (10, 10, 10)  # the centre of an outline is background
    assert tuple(blue_hollow[24, 11]) == A_COLORS[1]  # its left edge, 5 px out, is A's color
    jittered = render(replace(SCENE, jitter=(30, -50, 5)))
    assert tuple(jittered[24, 16]) == (245, 0, 45)  # red (215, 45, 40) plus the jitter, clipped


def test_with_attributes_changes_only_the_attributes_and_checks_the_target():
    scene = random_scene(random.Random(0))
    changed = scene.with_attributes([1, 1, 0, 0, 1])
    assert changed.attributes == [1, 1, 0, 0, 1]
    assert replace(changed, **dict(zip(("a_blue", "a_hollow", "a_pair", "left_of", "b_yellow"),
                                       scene.attributes))) == scene
    with pytest.raises(ValueError, match=r"target must be 0/1 for each of .*got \[1, 2, 0, 0, 1\]"):
        scene.with_attributes([1, 2, 0, 0, 1])


def test_sampling_repeats_for_a_seed_and_covers_every_value():
    first, second = sample_scenes({"a": 200}, 3)["a"], sample_scenes({"a": 200}, 3)["a"]
    assert first == second and first != sample_scenes({"a": 200}, 4)["a"]
    assert {tuple(column) for column in zip(*(s.attributes for s in first))} and all(
        set(column) == {0, 1} for column in zip(*(s.attributes for s in first)))
    assert {s.b_shape for s in first} == {"square", "disk", "triangle"}


def test_frozen_cnn_is_seeded_and_the_embeddings_are_unit_and_centred():
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    features = FrozenConvFeatures(0)(images)
    assert features.shape == (4, 1024) and not any(p.requires_grad for p in FrozenConvFeatures(0).parameters())
    torch.testing.assert_close(features, FrozenConvFeatures(0)(images))
    assert not torch.allclose(features, FrozenConvFeatures(1)(images))
    scenes = sample_scenes({"a": 64}, 0)["a"]
    z = default_embedder()(scenes)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(64))
    assert float((z @ z.T).mean()) < 0.2  # centred: raw ReLU features would sit near cosine 1
