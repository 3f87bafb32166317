"""A 2-D map of an attribute flow (spec 001 "Trajectory plot"; issue 11): real sources, the paths of
a few of them, and where every item lands, coloured by its target combination, in one PCA of the
evaluated split, ``DIR/plots/{split}_flow_map.png``, drawn from the module's ``latest_evaluation`` at the
end of fit (the last validation) and of test (``callbacks.evaluation_figures``).
"""

from __future__ import annotations

import lightning as L
import matplotlib
import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from callbacks.evaluation_figures import EvaluationFigures
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


class FlowMap(EvaluationFigures):
    def __init__(self, folder: str = "plots", num_paths: int = 40) -> None:
        super().__init__(folder)
        self.num_paths = num_paths

    @torch.no_grad()
    def figures(self, pl_module: L.LightningModule, latest: dict) -> dict[str, Figure]:
        few = [latest[name][: self.num_paths].to(pl_module.device) for name in ("z", "attributes", "target")]
        _, paths = pl_module.move(*few, return_path=True)
        return {"flow_map": flow_map_figure(latest["z"], latest["z_flowed"], paths.float().cpu(),
                                            combination_codes(latest["target"]))}
