"""Rendered two-group shape scenes seen through a small frozen CNN: the second, entangled embedding space
of attribute transfer (spec 001, issue 11).

In MiniLM's space every attribute of the block-world sentences is one word, and a class-mean shift
transfers it. Here the same five attributes (group A red or blue, filled or hollow, one or two, left of
or above group B, B green or yellow) are pixels: where A's color shows up depends on the layout, a pair
stacks across the relation's axis, and the CNN's ReLU features mix all of it with the nuisance values
(both groups' shapes, sizes, offsets, the gap, the background, color jitter), which are the item's identity. A
counterfactual re-renders the same nuisance values with the target attributes, so it is the true image
of the item under an attribute transfer.

The encoder is a three-layer ReLU CNN with weights drawn once from a fixed seed (He-normal) and never
trained: a deterministic, downloadable-nothing feature map whose pooled 4 x 4 grid keeps the layout.
Features are centered on the mean over a fixed set of reference scenes (rectified features all share
one direction, which would leave every pair of embeddings at a cosine near 1) and L2-normalized.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ATTRIBUTE_NAMES = ["a_blue", "a_hollow", "a_pair", "left_of", "b_yellow"]
IMAGE_SIZE = 48
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down, so sizes and edges vary below a pixel
A_COLORS = ((215, 45, 40), (45, 80, 220))  # red, blue
B_COLORS = ((40, 190, 60), (225, 215, 40))  # green, yellow
A_SHAPES = ("square", "disk")
B_SHAPES = ("square", "disk", "triangle")
OUTLINE_WIDTH = 1.5  # pixels, of a hollow A
ENCODER_SEED = 0
REFERENCE_SEED = 12345
NUM_REFERENCE_SCENES = 512


@dataclass(frozen=True)
class ShapeScene:
    """One scene: the five attributes (0/1) and the nuisance values that are its identity."""

    a_blue: int
    a_hollow: int  # 1: A drawn as an outline
    a_pair: int
    left_of: int  # 1: A left of B; 0: A above B
    b_yellow: int
    a_shape: str
    b_shape: str
    a_size: float  # half the side of A's squares, the radius of its disks (pixels)
    b_size: float
    gap: float  # distance between the centres of A and B
    center: tuple[float, float]
    background: int
    jitter: tuple[int, int, int]  # added to every object's color

    @property
    def attributes(self) -> list[int]:
        return [getattr(self, name) for name in ATTRIBUTE_NAMES]

    def with_attributes(self, target: Sequence[int | float]) -> ShapeScene:
        """The same nuisance values with the ``target`` attributes (0/1 each): the true counterfactual."""
        if len(target) != len(ATTRIBUTE_NAMES) or any(value not in (0, 1) for value in target):
            raise ValueError(f"target must be 0/1 for each of {ATTRIBUTE_NAMES}, got {list(target)}")
        return replace(self, **{name: int(value) for name, value in zip(ATTRIBUTE_NAMES, target)})


def random_scene(rng: random.Random) -> ShapeScene:
    return ShapeScene(*(rng.randint(0, 1) for _ in ATTRIBUTE_NAMES), a_shape=rng.choice(A_SHAPES),
                      b_shape=rng.choice(B_SHAPES),
                      a_size=rng.uniform(4.0, 6.0), b_size=rng.uniform(4.0, 6.5), gap=rng.uniform(14.0, 18.0),
                      center=(rng.uniform(-4.0, 4.0), rng.uniform(-4.0, 4.0)), background=rng.randint(0, 50),
                      jitter=tuple(rng.randint(-20, 20) for _ in range(3)))


def sample_scenes(sizes: dict[str, int], seed: int) -> dict[str, list[ShapeScene]]:
    """``sizes[split]`` scenes per split from one seeded stream (the nuisance values are continuous, so no
    scene falls in two splits)."""
    rng = random.Random(seed)
    return {split: [random_scene(rng) for _ in range(size)] for split, size in sizes.items()}


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, size: float, color: tuple,
          hollow: bool = False) -> None:
    s = SUPERSAMPLE
    x, y, size = x * s, y * s, size * s
    paint = {"outline": color, "width": round(OUTLINE_WIDTH * s)} if hollow else {"fill": color}
    if shape == "square":
        draw.rectangle((x - size, y - size, x + size, y + size), **paint)
    elif shape == "disk":
        draw.ellipse((x - size, y - size, x + size, y + size), **paint)
    else:
        draw.polygon(((x, y - size), (x - size, y + size), (x + size, y + size)), **paint)


def object_positions(scene: ShapeScene) -> tuple[list[tuple[float, float]], tuple[float, float]]:
    """The centres of A's objects (one, or a pair across the relation's axis) and of B."""
    cx, cy = IMAGE_SIZE / 2 + scene.center[0], IMAGE_SIZE / 2 + scene.center[1]
    half = scene.gap / 2
    axis, across = ((1.0, 0.0), (0.0, 1.0)) if scene.left_of else ((0.0, 1.0), (1.0, 0.0))
    a = (cx - half * axis[0], cy - half * axis[1])
    b = (cx + half * axis[0], cy + half * axis[1])
    if not scene.a_pair:
        return [a], b
    offset = 1.15 * scene.a_size
    return [(a[0] - offset * across[0], a[1] - offset * across[1]),
            (a[0] + offset * across[0], a[1] + offset * across[1])], b


def render(scene: ShapeScene) -> np.ndarray:
    """The scene as an RGB image ``[IMAGE_SIZE, IMAGE_SIZE, 3]`` of uint8."""
    side = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)

    def jittered(color: tuple) -> tuple:
        return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(color, scene.jitter))

    a_positions, b_position = object_positions(scene)
    for x, y in a_positions:
        _draw(draw, scene.a_shape, x, y, scene.a_size, jittered(A_COLORS[scene.a_blue]), hollow=bool(scene.a_hollow))
    _draw(draw, scene.b_shape, *b_position, scene.b_size, jittered(B_COLORS[scene.b_yellow]))
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


class FrozenConvFeatures(torch.nn.Module):
    """Three ReLU conv layers (32, 64, 64 channels; the last two stride 2) and a 4 x 4 average pool:
    ``[N, 3, 48, 48]`` images in [0, 1] to ``[N, 1024]`` features. Weights are He-normal from a fixed
    seed and never trained."""

    def __init__(self, seed: int = ENCODER_SEED) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList()
        for inputs, outputs, stride in ((3, 32, 1), (32, 64, 2), (64, 64, 2)):
            conv = torch.nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / (9 * inputs)) ** 0.5)
                conv.bias.zero_()
            self.layers.append(conv)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images - 0.5
        for conv in self.layers:
            x = F.relu(conv(x))
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@torch.no_grad()
def _features(scenes: Sequence[ShapeScene], encoder: FrozenConvFeatures, batch_size: int = 512) -> torch.Tensor:
    out = []
    for start in range(0, len(scenes), batch_size):
        images = np.stack([render(scene) for scene in scenes[start:start + batch_size]])
        out.append(encoder(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
    return torch.cat(out)


class ShapeSceneEmbedder:
    """Unit embeddings of scenes: frozen CNN features minus their mean over the reference scenes."""

    def __init__(self, seed: int = ENCODER_SEED) -> None:
        self.encoder = FrozenConvFeatures(seed).eval()
        reference = sample_scenes({"reference": NUM_REFERENCE_SCENES}, REFERENCE_SEED)["reference"]
        self.center = _features(reference, self.encoder).mean(dim=0)

    def __call__(self, scenes: Sequence[ShapeScene]) -> torch.Tensor:
        return F.normalize(_features(scenes, self.encoder) - self.center, dim=1)


@cache
def default_embedder() -> ShapeSceneEmbedder:
    """The embedder of ``ENCODER_SEED``, built once per process (its reference scenes take a second)."""
    return ShapeSceneEmbedder()
