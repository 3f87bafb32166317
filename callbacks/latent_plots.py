"""Pictures of the latent grid after every validation (spec 004 §0 "Plots", P1 "Logging & Visualization",
P2 "Metrics"): ``DIR/plots/<name>_step<global_step>.png`` and ``<name>_latest.png`` for ``spectra``,
``trends``, ``covariance``, ``montage``, ``embedding`` and, with a decoder, ``attention``, drawn from the
module's ``latent_snapshot`` (``modules.latent_snapshot.LatentSnapshot``); with a decoder also
``round_trips_latest.csv``, the held-out sentences and what the decoder writes from their latents (a W&B table
as well)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from modules.latent_snapshot import LatentSnapshot
from modules.losses.decoding import attention_concentration

# Natural images have power ~ radius^-2 (spec 004 P1 targets alpha in [1.5, 2.5]).
REFERENCE_SLOPE = 2.0
GAUSSIAN_KURTOSIS = 3.0
DPI = 100


class LatentPlots(Callback):
    """Saves the plots on rank 0 after every ``every_n_evaluations``-th validation of a fit, and
    logs them to W&B when a ``WandbLogger`` is attached.

    Runs in ``on_validation_end`` because callbacks' ``on_validation_epoch_end`` runs before the module's,
    where the snapshot is taken. The TV and kurtosis trends come from a history of every snapshot seen,
    kept in the checkpoint so a resumed run continues its trend lines.
    """

    def __init__(self, folder: str = "plots", every_n_evaluations: int = 1, max_groups: int = 12) -> None:
        if every_n_evaluations < 1:
            raise ValueError(f"every_n_evaluations must be >= 1, got {every_n_evaluations}")
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.folder = folder
        self.every_n_evaluations = every_n_evaluations
        self.max_groups = max_groups
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        snapshot: LatentSnapshot | None = getattr(pl_module, "latent_snapshot", None)
        if snapshot is None or (self.history and self.history[-1]["global_step"] == snapshot.global_step):
            return  # no new snapshot since the last validation
        self.history.append({"epoch": snapshot.epoch, "global_step": snapshot.global_step, "tv": snapshot.tv,
                             "mean_kurtosis": float(snapshot.kurtosis.mean())})
        if trainer.is_global_zero and len(self.history) % self.every_n_evaluations == 0:
            self._draw(trainer, snapshot)

    def _draw(self, trainer: L.Trainer, snapshot: LatentSnapshot) -> None:
        folder = Path(trainer.default_root_dir) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        figures = {
            "spectra": spectra_figure(snapshot),
            "trends": trends_figure(self.history),
            "covariance": correlation_figure(snapshot.correlation),
            "montage": montage_figure(snapshot.montage),
            "embedding": embedding_figure(snapshot, self.max_groups),
        }
        if snapshot.attention is not None:
            figures["attention"] = attention_figure(snapshot.attention, snapshot.attention_labels)
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for name, figure in figures.items():
            path = _save(figure, folder, name, snapshot.global_step)
            for logger in wandb_loggers:
                logger.log_image(key=f"plots/{name}", images=[str(path)], step=trainer.global_step)
        if snapshot.round_trips:
            _save_rows(snapshot.round_trips, folder / "round_trips_latest.csv")
            columns = list(snapshot.round_trips[0])
            for logger in wandb_loggers:
                logger.log_table(key="round_trips", columns=columns,
                                 data=[[row[name] for name in columns] for row in snapshot.round_trips],
                                 step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(entry) for entry in state_dict["history"]]


def _save(figure: Figure, folder: Path, name: str, global_step: int) -> Path:
    # Figures made without pyplot belong to no backend or figure manager, so there is nothing to close.
    path = folder / f"{name}_step{global_step:07d}.png"
    figure.savefig(path, dpi=DPI)
    partial = folder / f"{name}_latest.png.partial"
    shutil.copyfile(path, partial)
    os.replace(partial, folder / f"{name}_latest.png")  # a viewer never reads a half-written image
    return path


def _save_rows(rows: list[dict], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def spectra_figure(snapshot: LatentSnapshot) -> Figure:
    """Per-channel radial power spectra on log-log axes, fitted alpha in the legend, slope -2 for reference
    (spec 004 P1: target alpha in [1.5, 2.5], DC ignored)."""
    positive = snapshot.radii > 0
    radii, power = snapshot.radii[positive], snapshot.power[:, positive]
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for channel, (channel_power, alpha) in enumerate(zip(power, snapshot.alpha)):
        axes.loglog(radii, channel_power, label=f"channel {channel}: α = {float(alpha):.2f}")
    reference = power[:, 0].mean() * (radii / radii[0]) ** -REFERENCE_SLOPE
    axes.loglog(radii, reference, "k--", label=f"slope −{REFERENCE_SLOPE:g}")
    axes.set(xlabel="radial frequency", ylabel="power", title=f"Radial spectra, step {snapshot.global_step}")
    axes.legend(fontsize="small")
    return figure


def trends_figure(history: list[dict[str, float]]) -> Figure:
    """TV and mean gradient kurtosis over the validations so far (spec 004 P1: TV falls and plateaus above
    zero, kurtosis above the Gaussian 3)."""
    steps = [entry["global_step"] for entry in history]
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    tv_axes, kurtosis_axes = figure.subplots(1, 2)
    tv_axes.plot(steps, [entry["tv"] for entry in history], "o-")
    tv_axes.set(xlabel="step", ylabel="total variation", title="TV")
    kurtosis_axes.plot(steps, [entry["mean_kurtosis"] for entry in history], "o-")
    kurtosis_axes.axhline(GAUSSIAN_KURTOSIS, color="k", linestyle="--", label="Gaussian")
    kurtosis_axes.set(xlabel="step", ylabel="kurtosis", title="Mean gradient kurtosis")
    kurtosis_axes.legend(fontsize="small")
    return figure


def correlation_figure(correlation: Tensor) -> Figure:
    """Channel correlation heatmap with its values written in (spec 004 P1: near-diagonal)."""
    channels = correlation.shape[0]
    figure = Figure(figsize=(1 + 0.7 * channels, 0.7 * channels + 0.5), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(correlation, cmap="coolwarm", vmin=-1, vmax=1)
    for row in range(channels):
        for column in range(channels):
            value = float(correlation[row, column])
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize="small",
                      color="white" if abs(value) > 0.6 else "black")  # readable on the saturated cells
    axes.set(xticks=range(channels), yticks=range(channels), xlabel="channel", ylabel="channel",
             title="Channel correlation")
    figure.colorbar(image, ax=axes)
    return figure


def montage_image(montage: Tensor) -> Tensor:
    """Tiles montage [S, C, H, W] into one image [S (H + 1) - 1, C (W + 1) - 1]: a row per sentence, a column
    per channel, each channel scaled to [0, 1] over all sentences and NaN gutters between tiles."""
    if montage.ndim != 4:
        raise ValueError(f"montage must have shape [S, C, H, W], got {tuple(montage.shape)}")
    low = montage.amin(dim=(0, 2, 3), keepdim=True)
    high = montage.amax(dim=(0, 2, 3), keepdim=True)
    scaled = (montage - low) / (high - low).clamp_min(torch.finfo(montage.dtype).tiny)
    tiles = F.pad(scaled, (0, 1, 0, 1), value=float("nan"))
    return rearrange(tiles, "s c h w -> (s h) (c w)")[:-1, :-1]


def montage_figure(montage: Tensor) -> Figure:
    """The channels of the fixed montage sentences, one shared color scale per channel (spec 004 P1)."""
    sentences, channels, height, width = montage.shape
    figure = Figure(figsize=(1 + 0.6 * channels, 0.6 + 0.6 * sentences), layout="constrained")
    axes = figure.add_subplot()
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    axes.imshow(montage_image(montage.float()), cmap=colormap, vmin=0, vmax=1, interpolation="nearest")
    low, high = montage.amin(dim=(0, 2, 3)), montage.amax(dim=(0, 2, 3))
    axes.set_xticks([channel * (width + 1) + (width - 1) / 2 for channel in range(channels)],
                    [f"{channel}\n[{float(low[channel]):.2g}, {float(high[channel]):.2g}]"
                     for channel in range(channels)], fontsize="x-small")
    axes.set_yticks([sentence * (height + 1) + (height - 1) / 2 for sentence in range(sentences)],
                    [str(sentence) for sentence in range(sentences)], fontsize="x-small")
    axes.set(xlabel="channel [min, max]", ylabel="sentence", title="Latent montage")
    return figure


def principal_components(z: Tensor, num_components: int = 2) -> Tensor:
    """Coordinates [N, num_components] of the rows of ``z`` [N, D] on their first principal axes (SVD of the
    centred rows; deterministic, unlike ``torch.pca_lowrank``)."""
    if z.ndim != 2 or min(z.shape) < num_components:
        raise ValueError(f"z must have shape [N, D] with N, D >= {num_components}, got {tuple(z.shape)}")
    centred = (z - z.mean(dim=0)).double()
    _, _, axes = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ axes[:num_components].T).float()


def embedding_figure(snapshot: LatentSnapshot, max_groups: int) -> Figure:
    """2-D PCA of the embeddings z, colored by paraphrase group for the first ``max_groups`` groups,
    the others grey, counterfactuals as crosses (spec 004 P2: paraphrase clusters tight, counterfactuals
    far)."""
    coordinates = principal_components(snapshot.z).numpy()
    # Sorted group ids, and the position of each embedding's group among them.
    groups, group_index = torch.unique(snapshot.z_group, return_inverse=True)
    colormap = matplotlib.colormaps["tab20"]
    colors = colormap(group_index.numpy() % colormap.N)
    shown = (group_index < max_groups).numpy()
    colors[~shown] = to_rgba("lightgrey")
    figure = Figure(figsize=(6, 5), layout="constrained")
    axes = figure.add_subplot()
    for in_shown_group in (~shown, shown):  # grey context first, so the colored groups lie on top
        for is_counterfactual, marker in ((False, "o"), (True, "x")):
            chosen = in_shown_group & (snapshot.z_is_counterfactual == is_counterfactual).numpy()
            axes.scatter(*coordinates[chosen].T, s=24, marker=marker, c=colors[chosen])
    axes.legend(handles=[Line2D([], [], marker="o", linestyle="", color="grey", label="paraphrase"),
                         Line2D([], [], marker="x", linestyle="", color="grey", label="counterfactual")],
                fontsize="small")
    shown_groups = min(max_groups, len(groups))
    axes.set(xlabel="PC 1", ylabel="PC 2",
             title=f"z, first {shown_groups} of {len(groups)} groups, step {snapshot.global_step}")
    return figure


def attention_figure(attention: Tensor, labels: list[str], columns: int = 8) -> Figure:
    """The decoder's attention over the grid for each content token it writes (spec 004 P4 "Token→V attention
    maps"), one panel per token titled by its sentence, the token, and its entropy over the uniform's."""
    count = len(attention)
    rows = -(-count // columns)
    figure = Figure(figsize=(1.6 * columns, 1.8 * rows), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False)
    for panel in panels.flat:
        panel.set_axis_off()
    entropies = attention_concentration(attention.flatten(1))["entropy"]
    for panel, weights, label, entropy in zip(panels.flat, attention, labels, entropies.tolist()):
        panel.imshow(weights, cmap="magma", interpolation="nearest")
        panel.set_title(f"{label}\nH={entropy:.2f}", fontsize="x-small")
    figure.suptitle("Decoder attention over V per content token (H: entropy / uniform's)")
    return figure
