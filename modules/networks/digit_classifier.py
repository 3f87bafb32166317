"""A small CNN on scikit-learn's 8x8 digits: the feature space of the digits Fréchet distance.

Images are ``[B, 1, 8, 8]`` with pixels in ``[-1, 1]`` (the digits' 0..16 counts as
``pixels / 8 - 1``). The 128-wide penultimate layer is the feature space; ``forward`` returns it,
so the module plugs into torchmetrics' ``FrechetInceptionDistance(feature=...)`` the way Inception's
pool features do for FID (Heusel et al., NeurIPS 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
BACKGROUND = -1.0  # a blank pixel (count 0) after pixels / 8 - 1


class DigitClassifier(nn.Module):
    """conv 1->32 (3x3, pad 1), ReLU, conv 32->64 (3x3, pad 1), ReLU, 2x2 max-pool to 4x4,
    flatten, linear 1024->128, ReLU (the features), linear 128->10 (the logits)."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, 128]`` of images ``[B, 1, 8, 8]``."""
        _check_images(images)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The features, not the logits: torchmetrics calls ``forward`` for a feature extractor."""
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``[B, 10]``."""
        return self.head(self.features(images))


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE or not images.is_floating_point():
        raise ValueError(f"images must be float [B, 1, 8, 8] with pixels in [-1, 1] (digits as "
                         f"pixels / 8 - 1); got dtype {images.dtype} and shape {tuple(images.shape)}")


def random_shifts(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random (dy, dx) in {-1, 0, 1}^2, blank pixels filling the edge
    it leaves (pad by one pixel of ``BACKGROUND``, then an 8x8 crop at a random offset)."""
    batch = len(images)
    padded = F.pad(images, (1, 1, 1, 1), value=BACKGROUND)
    offsets = torch.randint(0, 3, (batch, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(8))[:, None, :, None].expand(batch, 1, 8, 10)
    cropped_rows = padded.gather(2, rows.to(images.device))
    columns = (offsets[:, 1, None] + torch.arange(8))[:, None, None, :].expand(batch, 1, 8, 8)
    return cropped_rows.gather(3, columns.to(images.device))


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 30,
                           batch_size: int = 64, lr: float = 1e-3) -> DigitClassifier:
    """Train a ``DigitClassifier`` and return it frozen (eval mode, ``requires_grad`` off).

    Training, exactly: weights initialized by PyTorch's defaults under ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng`` (the global RNG is left as it was); then ``epochs`` passes over
    the images in a fresh random order each, in mini-batches of ``batch_size`` (the last one
    smaller), minimizing the cross-entropy of the logits with Adam (learning rate ``lr``, default
    betas, no weight decay, no schedule). Every batch is augmented by moving each image by a random
    whole-pixel shift of -1, 0 or +1 along each axis (blank pixels fill in). The order and the shifts
    come from one ``torch.Generator`` seeded with ``seed``, so training is deterministic given the seed
    (on a given machine and thread count).
    """
    _check_images(images)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] for images [N, 1, 8, 8]; got labels {tuple(labels.shape)} "
                         f"and images {tuple(images.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier().to(images.device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    labels = labels.long()
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(images), generator=generator).split(batch_size):
                batch = batch.to(images.device)
                loss = F.cross_entropy(model.logits(random_shifts(images[batch], generator)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` whose highest logit is the true label."""
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N] for images [N, 1, 8, 8]; got labels {tuple(labels.shape)} "
                         f"and images {tuple(images.shape)}")
    return (model.logits(images).argmax(dim=1) == labels.to(images.device)).float().mean().item()
