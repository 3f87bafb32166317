"""How well moved embeddings carry their target attributes (spec 001; issue 11, "Evaluation").

Nothing here is ever fitted on moved points. The attribute probes are logistic regressions fitted
once on real embeddings of the datamodule's ``probe`` split and then frozen (``fit_probes``); the
public code behind the spec scored probes fitted on the flowed points with the target labels,
which a field mapping every target to one point satisfies perfectly. For moved points
``z_moved [N, D]`` from sources with ``attributes [N, A]`` toward ``targets [N, A]``:

* ``flipped_accuracy``: the probes' accuracy on the (item, attribute) pairs the target flips;
  ``kept_accuracy``: on the pairs it keeps; ``all_correct``: items with every attribute right;
  each also per attribute (``flipped_accuracy/<name>``, ``kept_accuracy/<name>``);
* ``cos_to_counterfactual``: ``cos(z_moved, z*)`` with the true counterfactual ``z*`` (when known),
  and ``counterfactual_rank``: the share of real embeddings with the target attributes nearer to
  ``z_moved`` than ``z*`` (0: ``z*`` is the nearest);
* ``nearest_real_correct``: the share of items whose nearest real embedding has exactly the target
  attributes (a check without a probe; on the worlds the attributes are the generator's, which the
  rule-based parser reads back from every sentence);
* collapse: ``nn_uniqueness``, distinct nearest real neighbours over items (1/N when everything
  lands on one point), and ``spread_ratio``, the mean within-combination spread of the moved points
  over that of real points of the same combinations;
* the spec's own numbers, reported and not gated: ``movement`` (mean ``||z_moved - z||``),
  ``silhouette_by_target`` and ``purity`` (k-means into as many clusters as target combinations).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score

from clustering.attributes import combination_codes
from clustering.kmeans import kmeans

STD_FLOOR_SHARE = 0.1


def fit_probes(real_embeddings: torch.Tensor, real_attributes: torch.Tensor, c: float = 1.0, seed: int = 0,
               standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic probe per attribute on standardized real embeddings; returns weights ``[A, D]`` and
    biases ``[A]`` on the raw embeddings (the standardization folded in). Standardizing matters for
    attributes a few coordinates carry (a plain probe read the block world's shape binding at 0.93);
    ``standardize=False`` fits on the raw embeddings. The scale of a coordinate is floored at
    ``STD_FLOOR_SHARE`` of the median coordinate's: sentence embeddings have coordinates that are all
    but constant over real data (MiniLM: a standard deviation of 1e-33 on the block world), and dividing
    by that would make the probe read any moved point by its noise there alone."""
    features = real_embeddings.double()
    std = features.std(dim=0)
    mean, std = features.mean(dim=0), std.clamp(min=STD_FLOOR_SHARE * float(std.median()))
    if not standardize:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    standardized = ((features - mean) / std).numpy()
    weights, biases = [], []
    for column in real_attributes.T:
        labels = column.round().long().numpy()
        if len(np.unique(labels)) < 2:
            raise ValueError("every attribute needs both values among the probe split's real embeddings")
        probe = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(standardized, labels)
        weight = torch.from_numpy(probe.coef_[0]) / std
        weights.append(weight.float())
        biases.append((float(probe.intercept_[0]) - weight @ mean).float())
    return torch.stack(weights), torch.stack(biases)


def probe_attributes(z: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """The probes' 0/1 reading of each row ``[N, A]``."""
    return (z.float() @ weights.T.to(z.device) + biases.to(z.device) > 0).float()


def _accuracy(hits: torch.Tensor, where: torch.Tensor) -> float:
    count = where.sum()
    return float((hits & where).sum() / count) if count > 0 else float("nan")


def probe_metrics(z_moved: torch.Tensor, attributes: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  biases: torch.Tensor, names: list[str]) -> dict[str, float]:
    read = probe_attributes(z_moved, weights, biases)
    hits, flipped = read == targets, targets != attributes
    metrics = {"flipped_accuracy": _accuracy(hits, flipped), "kept_accuracy": _accuracy(hits, ~flipped),
               "all_correct": float(hits.all(dim=1).float().mean())}
    for column, name in enumerate(names):
        metrics[f"flipped_accuracy/{name}"] = _accuracy(hits[:, column], flipped[:, column])
        metrics[f"kept_accuracy/{name}"] = _accuracy(hits[:, column], ~flipped[:, column])
    return metrics


def counterfactual_metrics(z_moved: torch.Tensor, z_star: torch.Tensor, targets: torch.Tensor,
                           real: torch.Tensor, real_attributes: torch.Tensor) -> dict[str, float]:
    cos_star = (z_moved * z_star).sum(dim=1)
    same = combination_codes(real_attributes).unsqueeze(0) == combination_codes(targets).unsqueeze(1)  # [N, M]
    closer = ((z_moved @ real.T) > cos_star.unsqueeze(1)) & same
    rank = closer.sum(dim=1).float() / same.sum(dim=1).clamp(min=1)
    return {"cos_to_counterfactual": float(cos_star.mean()), "counterfactual_rank": float(rank.mean())}


def neighbour_metrics(z_moved: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
                      real_attributes: torch.Tensor) -> dict[str, float]:
    nearest = (z_moved @ real.T).argmax(dim=1)
    target_codes, real_codes = combination_codes(targets), combination_codes(real_attributes)
    return {"nearest_real_correct": float((real_codes[nearest] == target_codes).float().mean()),
            "nn_uniqueness": len(nearest.unique()) / len(nearest),
            "spread_ratio": spread_ratio(z_moved, target_codes, real, real_codes)}


def spread_ratio(z_moved: torch.Tensor, codes: torch.Tensor, real: torch.Tensor, real_codes: torch.Tensor) -> float:
    """Mean distance to the combination's centroid, moved over real, averaged over combinations both hold."""
    ratios = []
    for code in codes.unique():
        moved, reals = z_moved[codes == code], real[real_codes == code]
        if len(moved) > 1 and len(reals) > 1:
            ratios.append(_spread(moved) / max(_spread(reals), 1e-8))
    return float(np.mean(ratios)) if ratios else float("nan")


def _spread(points: torch.Tensor) -> float:
    return float((points - points.mean(dim=0)).norm(dim=1).mean())


def spec_metrics(z_moved: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, seed: int = 0) -> dict[str, float]:
    codes = combination_codes(targets)
    metrics = {"movement": float((z_moved - z).norm(dim=1).mean())}
    num = len(codes.unique())
    if 1 < num < len(codes):
        metrics["silhouette_by_target"] = float(silhouette_score(z_moved.numpy(), codes.numpy(), metric="cosine"))
        clusters = kmeans(z_moved, num, seed=seed, gpu=False).assignments
        table = torch.zeros(int(clusters.max()) + 1, int(codes.max()) + 1)
        table.index_put_((clusters, codes), torch.ones(len(codes)), accumulate=True)
        metrics["purity"] = float(table.max(dim=1).values.sum() / len(codes))
    return metrics


def transfer_metrics(z_moved: torch.Tensor, z: torch.Tensor, attributes: torch.Tensor, targets: torch.Tensor,
                     probes: tuple[torch.Tensor, torch.Tensor], names: list[str], real: torch.Tensor,
                     real_attributes: torch.Tensor, z_star: torch.Tensor | None = None) -> dict[str, float]:
    """Every metric of the module docstring; ``real``/``real_attributes`` are the real embeddings the
    neighbour checks search (never the moved points)."""
    z_moved, z = F.normalize(z_moved.float().cpu(), dim=1), z.float().cpu()
    attributes, targets = attributes.float().cpu(), targets.float().cpu()
    real, real_attributes = real.float().cpu(), real_attributes.float().cpu()
    metrics = probe_metrics(z_moved, attributes, targets, *probes, names)
    metrics |= neighbour_metrics(z_moved, targets, real, real_attributes)
    metrics |= spec_metrics(z_moved, z, targets)
    if z_star is not None:
        metrics |= counterfactual_metrics(z_moved, z_star.float().cpu(), targets, real, real_attributes)
    return metrics


# ---- baselines (issue 11, "Baselines in the same run") ----------------------------------------------
STEERING_STRENGTHS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def class_mean_directions(real: torch.Tensor, real_attributes: torch.Tensor) -> torch.Tensor:
    """Per attribute, the difference of the class means of real embeddings ``[A, D]`` (InterFaceGAN-style)."""
    ones = real_attributes.T.float()  # [A, N]
    mean_one = ones @ real / ones.sum(dim=1, keepdim=True).clamp(min=1)
    mean_zero = (1 - ones) @ real / (1 - ones).sum(dim=1, keepdim=True).clamp(min=1)
    return mean_one - mean_zero


def linear_steering(z: torch.Tensor, attributes: torch.Tensor, targets: torch.Tensor, directions: torch.Tensor,
                    strength: float) -> torch.Tensor:
    """``normalize(z + strength * sum_a (t_a - y_a) d_a)``: each flipped attribute's direction added."""
    return F.normalize(z + strength * (targets - attributes) @ directions, dim=1)


def choose_strength(z: torch.Tensor, attributes: torch.Tensor, targets: torch.Tensor, directions: torch.Tensor,
                    probes: tuple[torch.Tensor, torch.Tensor], names: list[str]) -> float:
    """The steering strength with the best mean of flipped and kept accuracy on these (validation) items."""
    def score(strength: float) -> float:
        metrics = probe_metrics(linear_steering(z, attributes, targets, directions, strength), attributes, targets,
                                *probes, names)
        return metrics["flipped_accuracy"] + metrics["kept_accuracy"]

    return max(STEERING_STRENGTHS, key=score)


def nearest_with_targets(z: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
                         real_attributes: torch.Tensor) -> torch.Tensor:
    """Each item's nearest real embedding with exactly its target attributes (the item itself where none has)."""
    same = combination_codes(real_attributes).unsqueeze(0) == combination_codes(targets).unsqueeze(1)
    similarity = (z @ real.T).masked_fill(~same, -2.0)
    best = similarity.argmax(dim=1)
    return torch.where(same.any(dim=1, keepdim=True), real[best], z)
