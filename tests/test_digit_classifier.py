"""The digits feature network: held-out accuracy, determinism given the seed, shapes and errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from modules.networks.digit_classifier import (
    DigitClassifier,
    classifier_accuracy,
    random_shifts,
    train_digit_classifier,
)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """A seeded 80/20 split of scikit-learn's 1,797 digits, pixels scaled as pixels / 8 - 1."""
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[: int(0.8 * len(order))], order[int(0.8 * len(order)):]
    return {"train_images": images[train], "train_labels": labels[train],
            "test_images": images[test], "test_labels": labels[test]}


def test_held_out_accuracy_is_high(digits):
    # 6 epochs (~1 s on 2 idle cores) reach 96-99% over seeds 0-2; the default 30 reach ~99.7%.
    model = train_digit_classifier(digits["train_images"], digits["train_labels"], seed=0, epochs=6)
    assert len(digits["test_labels"]) == 360
    assert classifier_accuracy(model, digits["test_images"], digits["test_labels"]) > 0.9
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_same_seed_same_weights_other_seed_other_weights(digits):
    images, labels = digits["train_images"][:256], digits["train_labels"][:256]
    first, second, other = (train_digit_classifier(images, labels, seed=seed, epochs=2) for seed in (3, 3, 4))
    weights = (model.state_dict().values() for model in (first, second, other))
    for a, b, c in zip(*weights):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_training_leaves_the_global_rng_alone(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_digit_classifier(digits["train_images"][:64], digits["train_labels"][:64], epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_forward_returns_the_features():
    model = DigitClassifier()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    assert model.num_features == 128
    assert model(images).shape == (5, 128) and torch.equal(model(images), model.features(images))
    assert model.logits(images).shape == (5, 10)


def test_wrong_input_shape_is_explained():
    with pytest.raises(ValueError, match=r"images must be float \[B, 1, 8, 8\].*got .* shape \(5, 64\)"):
        DigitClassifier()(torch.zeros(5, 64))
    with pytest.raises(ValueError, match=r"labels must be \[N\].*labels \(4, 1\)"):
        train_digit_classifier(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1), epochs=1)


def test_random_shifts_move_by_at_most_one_pixel():
    image = torch.arange(64.0).view(1, 1, 8, 8).expand(200, 1, 8, 8)
    shifted = random_shifts(image, torch.Generator().manual_seed(0))
    # Pixel (3, 3) of the output holds one of the input's pixels (2..4, 2..4), each offset seen.
    centre = shifted[:, 0, 3, 3]
    allowed = {8.0 * r + c for r in (2, 3, 4) for c in (2, 3, 4)}
    assert set(centre.tolist()) == allowed
    # Edges left behind are blank (-1); the rest of each image is a translated copy.
    assert ((shifted == -1) | (shifted >= 0)).all()
    assert (shifted[:, 0, 3, 3] - shifted[:, 0, 3, 4] == -1).all()
