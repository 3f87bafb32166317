"""A 2-D map of an attribute flow (spec 001 "Trajectory plot"; issue 11): real sources, the paths of
a few of them, and where every item lands, coloured by its target combination, in one PCA of the
evaluated split. Drawn on rank 0 from the module's ``latest_evaluation`` at the end of fit (the last
validation) and of test, to ``DIR/plots/{split}_flow_map.png`` and W&B when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from clustering.attributes import combination_codes

DPI = 100


def flow_map_figure(z: torch.Tensor, z_flowed: torch.Tensor, paths: torch.Tensor, target_codes: torch.Tensor) -> Figure:
    """``paths [K + 1, n, D]`` of the first ``n`` items."""
    pca = PCA(n_components=2, random_state=0).fit(torch.cat([z, z_flowed]).numpy())
    sources, landed = pca.transform(z.numpy()), pca.transform(z_flowed.numpy())
    colours = matplotlib.colormaps["tab20"]
    figure = Figure(figsize=(7, 6), dpi=DPI)
    axes = figure.add_subplot()
    axes.scatter(sources[:, 0], sources[:, 1], s=5, color="lightgray", label="real sources")
    axes.scatter(landed[:, 0], landed[:, 1], s=7, c=[colours(int(code) % 20) for code in target_codes],
                 label="flowed (colour: target combination)")
    for item in range(paths.shape[1]):
        path = pca.transform(paths[:, item].numpy())
        axes.plot(path[:, 0], path[:, 1], color="black", linewidth=0.6, alpha=0.6)
    axes.set_title(f"{len(z)} items, paths of {paths.shape[1]}")
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


class FlowMap(Callback):
    def __init__(self, folder: str = "plots", num_paths: int = 40) -> None:
        self.folder, self.num_paths = folder, num_paths

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        latest = getattr(pl_module, "latest_evaluation", None)
        if latest is None or not trainer.is_global_zero:
            return
        few = slice(0, self.num_paths)
        _, paths = pl_module.move(latest["z"][few].to(pl_module.device), latest["attributes"][few].to(pl_module.device),
                                  latest["target"][few].to(pl_module.device), return_path=True)
        figure = flow_map_figure(latest["z"], latest["z_flowed"], paths.float().cpu(),
                                 combination_codes(latest["target"]))
        folder = Path(trainer.default_root_dir) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{latest['split']}_flow_map.png"
        figure.savefig(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(f"{latest['split']}/flow_map", [str(path)], step=trainer.global_step)
