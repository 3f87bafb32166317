"""The IMU-text aligner (spec 002, issue 10): learning on generated UCI-HAR-layout files, the label
prototypes and their refresh (also under two-process DDP), exact resume, and clear errors."""

from __future__ import annotations

import json
import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.alignment_report import AlignmentReport
from callbacks.prototype_refresh import PrototypeRefresh
from callbacks.random_state import RandomState
from clustering.kmeans import kmeans
from datamodules.imu_windows import IMUTextDataModule
from modules.imu_classifier import SupervisedIMUClassifier
from modules.imu_text_alignment import IMUTextAlignment
from tests.conftest import PYTHON, REPO, StopAfterEpoch, quiet_trainer
from tests.har_fixtures import write_uci_har

LABELS = ("WALKING", "WALKING_UPSTAIRS", "SITTING", "STANDING", "LAYING")
TINY = {"width": 32, "depth": 1, "heads": 2, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 5}


@pytest.fixture(scope="module")
def har_root(tmp_path_factory):
    return write_uci_har(tmp_path_factory.mktemp("har"), num_train=200, num_test=100, labels=LABELS)


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("text-cache"))


def data_for(har_root, text_cache, **overrides) -> IMUTextDataModule:
    return IMUTextDataModule(data_dir=str(har_root), text_cache_dir=text_cache, batch_size=32, seed=0,
                             scale_sigma=0.1, jitter_sigma=0.05, **overrides)


def model_for(data: IMUTextDataModule, **overrides) -> IMUTextAlignment:
    return IMUTextAlignment(num_channels=data.num_channels, window_length=data.window_length,
                            text_dim=data.text_dim, **(TINY | overrides))


def label_refresh(every_n_steps: int = 4) -> PrototypeRefresh:
    return PrototypeRefresh(memory_attr="label_prototypes", rule="kmeans", every_n_steps=every_n_steps,
                            loader_method="label_batches", features_method="label_features",
                            report_method="report_label_clusters")


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("mode", ["hard", "hybrid"])
def test_smoke_fit_learns_zero_shot_recognition(har_root, text_cache, tmp_path, mode):
    L.seed_everything(0)
    data = data_for(har_root, text_cache)
    model = model_for(data, target_mode=mode, num_prototypes=3)
    record = RecordLoss()
    trainer = quiet_trainer(4, tmp_path, [label_refresh(), record, AlignmentReport()], enable_checkpointing=False)
    trainer.fit(model, data)
    metrics = trainer.test(model, data, verbose=False)[0]
    assert sum(record.losses[-5:]) / 5 < 0.8 * sum(record.losses[:5]) / 5  # the loss falls
    assert metrics["test/accuracy"] > 0.6  # chance is 1/5
    assert metrics["test/recall_at_2"] >= metrics["test/accuracy"]
    predicted = trainer.predict(model, data)
    hits = torch.cat([batch["predicted"] == batch["label"] for batch in predicted])
    assert len(hits) == 100 and hits.float().mean().item() == pytest.approx(metrics["test/accuracy"])
    plots = sorted(path.name for path in (tmp_path / "plots").iterdir())
    assert plots == ["test_confusion.png", "test_map.png", "val_confusion.png", "val_map.png"]
    stats = json.loads((tmp_path / "channel_stats.json").read_text())
    assert stats == data.channel_stats() and len(stats["mean"]) == data.num_channels


def test_prototypes_cluster_the_seen_label_texts_and_are_logged(har_root, text_cache, tmp_path, caplog):
    L.seed_everything(0)
    data = data_for(har_root, text_cache, holdout_activities=["standing"])
    model = model_for(data, target_mode="prototype", num_prototypes=3)
    refreshes = []

    class Count(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            refreshes.append(pl_module.refreshes)

    trainer = quiet_trainer(1, tmp_path, [label_refresh(every_n_steps=2), Count()], enable_checkpointing=False,
                            limit_val_batches=0)
    with caplog.at_level("INFO"):
        trainer.fit(model, data)
    assert refreshes == [1, 1, 2, 2]  # refreshed before steps 0 and 2 of the 4
    seen = data.seen_label_ids
    expected = kmeans(data.label_embeddings[seen], 3, seed=0).centroids
    assert torch.allclose(model.label_prototypes.prototypes, expected)
    # Each label's prototype row is the nearest of the centroids; the held-out one is still given one.
    nearest = torch.cdist(data.label_embeddings, expected).argmin(dim=1)
    assert torch.allclose(model.prototype_of_label, expected[nearest])
    out = caplog.text
    assert "Total unique labels: 4" in out and "Number of clusters: 3" in out
    assert "standing" not in "".join(line for line in out.splitlines() if line.strip().startswith("Cluster"))


def test_more_prototypes_than_seen_activities_is_an_error(har_root, text_cache, tmp_path):
    data = data_for(har_root, text_cache, holdout_activities=["walking", "sitting"])
    trainer = quiet_trainer(1, tmp_path, [label_refresh()])
    with pytest.raises(ValueError, match="num_prototypes=5 exceeds the 3 activities"):
        trainer.fit(model_for(data, target_mode="prototype", num_prototypes=5), data)


def test_prototype_modes_without_the_refresh_callback_name_it(har_root, text_cache, tmp_path):
    data = data_for(har_root, text_cache)
    trainer = quiet_trainer(1, tmp_path, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="PrototypeRefresh"):
        trainer.fit(model_for(data, target_mode="prototype", num_prototypes=3), data)


def test_resume_is_exact(har_root, text_cache, tmp_path):
    """Stopped after epoch 1 of 3 and resumed == uninterrupted (weights, prototypes, optimizer)."""

    def run(root, stop=(), ckpt_path=None):
        L.seed_everything(0)
        data = data_for(har_root, text_cache, rotate=True)
        model = model_for(data, target_mode="hybrid", num_prototypes=3)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        trainer = quiet_trainer(3, root, [label_refresh(every_n_steps=3), checkpoint, RandomState(), *stop],
                                limit_val_batches=0)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", [StopAfterEpoch(0)])
    resumed = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(straight.prototype_of_label, resumed.prototype_of_label)
    assert resumed.refreshes == straight.refreshes > 0  # the update count of the monitoring lines


def test_supervised_baseline_learns(har_root, text_cache, tmp_path):
    L.seed_everything(0)
    data = data_for(har_root, text_cache)
    model = SupervisedIMUClassifier(num_channels=data.num_channels, window_length=data.window_length,
                                    num_labels=data.num_labels, **TINY)
    trainer = quiet_trainer(6, tmp_path, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, data)
    assert trainer.test(model, data, verbose=False)[0]["test/accuracy"] > 0.6


def test_two_process_ddp_refreshes_identical_prototypes(har_root, text_cache, tmp_path):
    """Both ranks hold the k-means prototypes one process finds, and the monitoring lines come once."""
    root = tmp_path / "ddp"
    args = [PYTHON, "cli.py", "fit", "--config", "configs/imu_text.yaml", "--config", "configs/profiles/imu_text_cpu.yaml",
            "--data.init_args.data_dir", str(har_root), "--data.init_args.text_cache_dir", text_cache,
            "--data.init_args.batch_size", "16", "--model.init_args.target_mode", "prototype",
            "--model.init_args.num_prototypes", "3", "--model.init_args.width", "32", "--model.init_args.depth", "1",
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(root)]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (run.stdout + run.stderr).count("Updated prototypes (update #1)") == 1  # rank 0 only
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    data = data_for(har_root, text_cache)
    expected = kmeans(data.label_embeddings[data.seen_label_ids], 3, seed=0).centroids
    assert torch.allclose(state["label_prototypes.prototypes"], expected)
    assert (root / "channel_stats.json").exists()


@pytest.mark.parametrize("config", ["configs/imu_text.yaml", "configs/imu_supervised.yaml"])
def test_spec_sized_configs_run_one_step(har_root, text_cache, tmp_path, config):
    """The GPU-sized defaults (width 256, 4 layers) through one step and one evaluation, in process."""
    from cli import main as cli_main

    cli = cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.fast_dev_run", "1", "--trainer.logger", "false", "--data.init_args.data_dir", str(har_root),
                    "--data.init_args.text_cache_dir", text_cache, "--data.init_args.batch_size", "16"])
    assert cli.model.encoder.width == 256 and len(cli.model.encoder.transformer.layers) == 4
    assert 0.0 <= float(cli.trainer.callback_metrics["val/accuracy"]) <= 1.0
