"""LatentPlots on a tiny real Trainer whose module takes a random LatentSnapshot, LatentSnapshot's checks and
the plotting helpers' math."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from callbacks.latent_plots import LatentPlots, montage_image, principal_components
from modules.latent_snapshot import LatentSnapshot
from tests.tiny_module import TinyModule

PLOTS = ("spectra", "trends", "covariance", "montage", "embedding")


def random_snapshot(global_step: int, epoch: int = 0, channels: int = 6, seed: int = 0, **changes: Any
                    ) -> LatentSnapshot:
    generator = torch.Generator().manual_seed(seed)
    radii = torch.arange(17.0)
    fields = dict(
        montage=torch.randn(16, channels, 32, 32, generator=generator),
        radii=radii,
        power=(radii + 1) ** -2 * (1 + torch.rand(channels, 17, generator=generator)),
        alpha=1 + 2 * torch.rand(channels, generator=generator),
        correlation=torch.eye(channels),
        tv=0.5 + torch.rand((), generator=generator),
        kurtosis=3 + torch.rand(channels, generator=generator),
        z=torch.randn(60, 32, generator=generator),
        z_group=torch.arange(60) // 4,
        z_is_counterfactual=torch.arange(60) % 4 == 3,
        epoch=epoch,
        global_step=global_step,
    )
    return LatentSnapshot(**(fields | changes))


class SnapshotTaker(TinyModule):
    """Takes a random snapshot in its own ``on_validation_epoch_end``, as the latent modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.latent_snapshot: LatentSnapshot | None = None

    def on_validation_epoch_end(self) -> None:
        self.latent_snapshot = random_snapshot(self.global_step, self.current_epoch, seed=self.global_step)


def make_trainer(root: Path, plots: LatentPlots, max_epochs: int, logger: Any = False) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_epochs=max_epochs, limit_train_batches=1,
                     limit_val_batches=1, logger=logger, callbacks=[plots], accelerator="cpu", devices=1,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     log_every_n_steps=1)


def written(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder.iterdir()}


def test_each_evaluation_writes_five_plots_and_extends_the_trends(tmp_path):
    plots = LatentPlots()
    trainer = make_trainer(tmp_path, plots, max_epochs=2)
    model = SnapshotTaker()
    trainer.fit(model)
    files = written(tmp_path / "plots")
    suffixes = ("step0000001", "step0000002", "latest")
    expected = {f"{name}_{suffix}.png" for name in PLOTS for suffix in suffixes}
    assert set(files) == expected and min(files.values()) > 1000
    assert (tmp_path / "plots" / "montage_latest.png").read_bytes() == (
        tmp_path / "plots" / "montage_step0000002.png").read_bytes()
    assert [entry["global_step"] for entry in plots.history] == [1, 2]  # the sanity check is not drawn
    assert plots.history[-1]["tv"] == model.latent_snapshot.tv
    assert plots.history[-1]["mean_kurtosis"] == pytest.approx(float(model.latent_snapshot.kurtosis.mean()))

    trainer.validate(model, verbose=False)  # plots belong to fits only
    assert written(tmp_path / "plots") == files and len(plots.history) == 2


def test_every_n_evaluations_draws_every_nth_but_records_all(tmp_path):
    plots = LatentPlots(folder="pictures", every_n_evaluations=2)
    make_trainer(tmp_path, plots, max_epochs=3).fit(SnapshotTaker())
    assert set(written(tmp_path / "pictures")) == {f"{name}_{suffix}.png" for name in PLOTS
                                                   for suffix in ("step0000002", "latest")}
    assert len(plots.history) == 3


def test_history_survives_a_resume(tmp_path):
    plots = LatentPlots()
    trainer = make_trainer(tmp_path, plots, max_epochs=1)
    trainer.fit(SnapshotTaker())
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = LatentPlots()
    make_trainer(tmp_path, resumed, max_epochs=2).fit(SnapshotTaker(), ckpt_path=tmp_path / "one.ckpt")
    assert [entry["global_step"] for entry in resumed.history] == [1, 2]


def test_images_go_to_wandb_loggers(tmp_path, monkeypatch):
    logger = WandbLogger(save_dir=tmp_path, offline=True)
    logged: list[tuple[str, list[str], int]] = []
    monkeypatch.setattr(logger, "log_image", lambda key, images, step: logged.append((key, images, step)))
    make_trainer(tmp_path, LatentPlots(), max_epochs=1, logger=logger).fit(SnapshotTaker())
    assert [(key, step) for key, _, step in logged] == [(f"plots/{name}", 1) for name in PLOTS]
    assert all(Path(images[0]).name.endswith("_step0000001.png") for _, images, _ in logged)


def test_a_snapshot_already_drawn_is_not_drawn_again(tmp_path):
    plots = LatentPlots()
    trainer = make_trainer(tmp_path, plots, max_epochs=2)
    model = SnapshotTaker()
    model.on_validation_epoch_end = lambda: None  # a module that took one snapshot and no more
    model.latent_snapshot = random_snapshot(global_step=0)
    trainer.fit(model)
    assert len(plots.history) == 1
    assert {name for name in written(tmp_path / "plots") if "_step" in name} == {
        f"{name}_step0000000.png" for name in PLOTS}


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="every_n_evaluations must be >= 1, got 0"):
        LatentPlots(every_n_evaluations=0)
    with pytest.raises(ValueError, match="max_groups must be >= 1, got 0"):
        LatentPlots(max_groups=0)


@pytest.mark.parametrize("name, value, message", [
    ("montage", torch.zeros(16, 6, 32), r"montage must have 4 dimensions, got shape \(16, 6, 32\)"),
    ("power", torch.zeros(5, 17), r"power must have shape \(6, 17\).*got \(5, 17\)"),
    ("correlation", torch.zeros(6, 5), r"correlation must have shape \(6, 6\)"),
    ("z_group", torch.zeros(59), r"z_group must have shape \(60,\)"),
    ("z_is_counterfactual", torch.zeros(60), "z_is_counterfactual must be bool"),
])
def test_snapshot_rejects_inconsistent_shapes(name, value, message):
    with pytest.raises(ValueError, match=message):
        random_snapshot(global_step=0, **{name: value})


def test_snapshot_holds_detached_tensors_and_a_float_tv():
    z = torch.randn(60, 32, requires_grad=True)
    snapshot = random_snapshot(global_step=0, z=z * 2, tv=torch.tensor(0.25))
    assert not snapshot.z.requires_grad and snapshot.z.device.type == "cpu"
    assert isinstance(snapshot.tv, float) and snapshot.tv == 0.25


def test_principal_components_of_points_on_a_line():
    along = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # on the diagonal of the first two axes, constant along the third
    z = torch.stack([along, along, torch.full_like(along, 5.0)], dim=1)
    coordinates = principal_components(z)
    # centred positions along the unit direction (1, 1, 0) / sqrt(2): -1.5, -0.5, 0.5, 1.5 times sqrt(2)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) * math.sqrt(2)
    assert coordinates[:, 0].abs() == pytest.approx(expected.abs(), abs=1e-5)
    assert coordinates[:, 1] == pytest.approx(torch.zeros(4), abs=1e-5)
    with pytest.raises(ValueError, match=r"z must have shape \[N, D\] with N, D >= 2, got \(4, 1\)"):
        principal_components(z[:, :1])


def test_montage_image_scales_each_channel_over_all_sentences():
    montage = torch.tensor([[[[0.0]], [[10.0]]], [[[2.0]], [[20.0]]]])  # 2 sentences, 2 channels, 1 x 1
    nan = float("nan")
    expected = torch.tensor([[0.0, nan, 0.0], [nan, nan, nan], [1.0, nan, 1.0]])
    assert torch.equal(montage_image(montage).isnan(), expected.isnan())
    assert torch.equal(montage_image(montage).nan_to_num(-1), expected.nan_to_num(-1))
    flat = montage_image(torch.ones(1, 1, 2, 2))
    assert torch.equal(flat, torch.zeros(2, 2))  # a constant channel maps to 0, not NaN
