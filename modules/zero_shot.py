"""Zero-shot activity recognition by the nearest label text (issue 10, "Evaluation").

A window is classified as the candidate label whose text embedding is nearest (largest cosine) to
the window's embedding; a supervised classifier's logits are scored the same way. The candidates are
the labels the evaluated windows carry, matched by text (``datamodules.imu_windows``), so an
evaluation set may hold activities training never saw. Reported (accuracies over windows):

* ``accuracy``, ``macro_f1``, and label retrieval ``recall_at_1`` and ``recall_at_2`` (each window a
  query with one relevant label: top-k accuracy), all through torchmetrics, over all candidates;
* with labels unseen in training (protocol B): ``unseen_accuracy``, the unseen windows among the
  unseen candidates only (chance ``1 / #unseen``), and the generalized zero-shot view over all
  candidates, ``seen_accuracy_all``, ``unseen_accuracy_all`` and their ``harmonic_mean``.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def restricted(scores: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[n, K]`` of the windows whose label is a candidate, and their targets in ``0..K-1``."""
    keep = torch.isin(labels, candidates)
    position = torch.full((int(max(labels.max(), candidates.max())) + 1,), -1, dtype=torch.long, device=labels.device)
    position[candidates] = torch.arange(len(candidates), device=labels.device)
    return scores[keep][:, candidates], position[labels[keep]]


def accuracy_among(scores: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor) -> float:
    picked, targets = restricted(scores, labels, candidates)
    return float((picked.argmax(dim=1) == targets).float().mean()) if len(targets) else float("nan")


def recall_at(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Share of window queries whose true label is among the ``k`` best-scored candidates."""
    if scores.shape[1] <= k:
        return 1.0
    return float(multiclass_accuracy(scores, targets, scores.shape[1], top_k=k, average="micro"))


def zero_shot_metrics(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor) -> dict[str, float]:
    """Metrics of windows with ``scores [N, L]`` over the whole label table and labels ``[N]``;
    ``seen`` holds the label ids training saw."""
    candidates = labels.unique()
    picked, targets = restricted(scores, labels, candidates)
    num = len(candidates)
    metrics = {
        "accuracy": float(multiclass_accuracy(picked, targets, num, average="micro")) if num > 1 else 1.0,
        "macro_f1": float(multiclass_f1_score(picked, targets, num, average="macro")) if num > 1 else 1.0,
        "recall_at_1": recall_at(picked, targets, 1),
        "recall_at_2": recall_at(picked, targets, 2),
    }
    unseen = candidates[~torch.isin(candidates, seen.to(candidates.device))]
    if len(unseen) > 1:
        metrics["unseen_accuracy"] = accuracy_among(scores, labels, unseen)
    if len(unseen) and len(unseen) < num:
        seen_here = candidates[torch.isin(candidates, seen.to(candidates.device))]
        seen_accuracy = accuracy_among(*restrict_windows(scores, labels, seen_here), candidates)
        unseen_accuracy = accuracy_among(*restrict_windows(scores, labels, unseen), candidates)
        metrics |= {"seen_accuracy_all": seen_accuracy, "unseen_accuracy_all": unseen_accuracy,
                    "harmonic_mean": harmonic_mean(seen_accuracy, unseen_accuracy)}
    return metrics


def restrict_windows(scores: torch.Tensor, labels: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(labels, wanted)
    return scores[keep], labels[keep]


def harmonic_mean(first: float, second: float) -> float:
    return 2 * first * second / (first + second) if first + second > 0 else 0.0
