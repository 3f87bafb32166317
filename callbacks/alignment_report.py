"""What an IMU-text alignment run leaves in its folder besides metrics (issue 10, "Data" and "Evaluation").

* ``DIR/channel_stats.json``: the per-channel mean and std of the training windows every split is
  normalized with (also in the checkpoint, with the datamodule's state);
* ``DIR/plots/{split}_confusion.png``: the zero-shot confusion matrix over the split's candidate labels;
* ``DIR/plots/{split}_map.png``: a 2-D map (PCA of the unit embeddings) of the windows, coloured by
  activity, beside the label texts they are matched against.

The plots are drawn from the module's ``latest_evaluation`` at the end of fit (the last validation)
and of test (``callbacks.evaluation_figures``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib
import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from torchmetrics.functional.classification import multiclass_confusion_matrix

from callbacks.evaluation_figures import EvaluationFigures
from callbacks.json_files import write_json_atomically
from modules.zero_shot import restricted

DPI = 100


def confusion_figure(scores: torch.Tensor, labels: torch.Tensor, names: list[str]) -> Figure:
    candidates = labels.unique()
    picked, targets = restricted(scores, labels, candidates)
    matrix = multiclass_confusion_matrix(picked.argmax(dim=1), targets, len(candidates)).numpy()
    ticks = [names[i] for i in candidates.tolist()]
    figure = Figure(figsize=(1.2 * len(ticks) + 2.5, 1.1 * len(ticks) + 2), dpi=DPI)
    axes = figure.add_subplot()
    axes.imshow(matrix, cmap="Blues")
    for row in range(len(ticks)):
        for column in range(len(ticks)):
            axes.text(column, row, str(matrix[row, column]), ha="center", va="center",
                      color="white" if matrix[row, column] > matrix.max() / 2 else "black")
    axes.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right")
    axes.set_yticks(range(len(ticks)), ticks)
    axes.set_xlabel("nearest label text")
    axes.set_ylabel("true activity")
    figure.tight_layout()
    return figure


def map_figure(embeddings: torch.Tensor, labels: torch.Tensor, label_embeddings: torch.Tensor,
               names: list[str]) -> Figure:
    candidates = labels.unique()
    texts = label_embeddings[candidates]
    points = PCA(n_components=2, random_state=0).fit_transform(torch.cat([embeddings, texts]).numpy())
    windows, text_points = points[: len(embeddings)], points[len(embeddings):]
    colours = matplotlib.colormaps["tab10"]
    figure = Figure(figsize=(7, 6), dpi=DPI)
    axes = figure.add_subplot()
    for position, label in enumerate(candidates.tolist()):
        mine = (labels == label).numpy()
        axes.scatter(windows[mine, 0], windows[mine, 1], s=6, alpha=0.5, color=colours(position % 10),
                     label=names[label])
        axes.scatter(*text_points[position], marker="*", s=250, color=colours(position % 10), edgecolors="black")
        axes.annotate(names[label], text_points[position], textcoords="offset points", xytext=(6, 6), fontsize=9)
    axes.set_title("windows (dots) and label texts (stars), PCA of the shared space")
    axes.legend(fontsize=8, markerscale=2, loc="best")
    figure.tight_layout()
    return figure


class AlignmentReport(EvaluationFigures):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json_atomically(Path(trainer.default_root_dir) / "channel_stats.json",
                                  trainer.datamodule.channel_stats())

    def figures(self, pl_module: L.LightningModule, latest: dict) -> dict[str, Figure]:
        names = latest["label_names"]
        return {"confusion": confusion_figure(latest["scores"], latest["labels"], names),
                "map": map_figure(latest["embeddings"], latest["labels"], latest["label_embeddings"], names)}
