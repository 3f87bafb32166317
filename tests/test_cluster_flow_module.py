"""ClusterFlowMatching: learning happens, every locality mode logs the spec's names, resume is exact,
the configs run from the command line."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.cluster_assignment import ClusterAssignment
from callbacks.random_state import RandomState
from datamodules.flow_data import FlowDataModule
from modules.cluster_flow import LOCALITY_FORMS, LOCALITY_MODES, ClusterFlowMatching
from modules.flow_evaluation import quality_by_nfe
from tests.conftest import StopAfterEpoch, quiet_trainer
from tests.test_cli import cli

TINY_FLOW = {"hidden_dim": 64, "depth": 2, "time_dim": 16, "warmup_steps": 5, "eval_nfe": [1, 8]}


def toy(mode="none", num_train=1024, batch_size=64, samples_per_cluster=4, source="8gaussians",
        pairing="independent", **model_args):
    data = FlowDataModule(dataset="moons", source=source, num_train=num_train, num_eval=400,
                          batch_size=batch_size, samples_per_cluster=samples_per_cluster, pairing=pairing)
    return ClusterFlowMatching(sample_shape=[2], locality_mode=mode, **(TINY_FLOW | model_args)), data


def held_out_w2(model: ClusterFlowMatching, data: FlowDataModule) -> float:
    batch = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
    return quality_by_nfe(model.velocity, batch["x0"], batch["x"], [8])["w2_nfe8"]


def test_smoke_fit_in_cluster_mode_beats_the_untrained_field(tmp_path):
    L.seed_everything(0)
    model, data = toy("cluster_neighborhood", source="gaussian", lr=3e-3)
    data.setup("fit")
    untrained = held_out_w2(model, data)
    trainer = quiet_trainer(12, tmp_path, [ClusterAssignment(num_clusters=8)], limit_val_batches=0)
    trainer.fit(model, data)
    trained = held_out_w2(model, data)
    assert trained < 0.65 * untrained, (trained, untrained)  # 192 steps: 1.11 -> 0.58 when written
    metrics = trainer.callback_metrics
    assert metrics["training/locality_valid_ratio"] == 1.0  # cluster-mate batches: every sample paired
    assert 4 < metrics["training/locality_n_unique_clusters"] <= 8  # 16 groups of 4 from the 8 clusters
    assert metrics["training/loss_flow"] < 3.0


@pytest.mark.parametrize("mode", LOCALITY_MODES)
def test_every_mode_logs_the_spec_names(tmp_path, mode):
    # the residual form and OT pairing on the cluster mode, so every option runs through a fit
    options = {"locality_form": "residual", "pairing": "minibatch_ot"} if mode == "cluster_neighborhood" else {}
    model, data = toy(mode, samples_per_cluster=0, **options)
    callbacks = [ClusterAssignment(num_clusters=40)] if mode == "cluster_neighborhood" else []
    trainer = quiet_trainer(1, tmp_path, callbacks, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, data)
    logged = set(trainer.callback_metrics)
    assert trainer.callback_metrics["training/locality_mode"] == LOCALITY_MODES.index(mode)
    assert trainer.callback_metrics["training/locality_form"] == LOCALITY_FORMS.index(model.hparams.locality_form)
    assert {"training/loss_epoch", "val/w2_nfe1", "val/w2_nfe8", "val/mmd2_nfe8", "val/straightness",
            "val/path_length_ratio"} <= logged
    locality = {"training/loss_locality", "training/locality_target_diff"}
    cluster = {"training/locality_valid_pairs", "training/locality_valid_ratio",
               "training/locality_n_unique_clusters"}
    assert (locality <= logged) == (mode != "none") and (cluster <= logged) == (mode == "cluster_neighborhood")
    if mode == "random_perturbation":  # targets differ by 0.1 * noise: E[diff^2] per dimension = 0.01
        assert trainer.callback_metrics["training/locality_target_diff"] == pytest.approx(0.01, rel=0.3)
    if mode == "cluster_neighborhood":  # 40 clusters, random batches of 64: some samples lack a mate
        assert 0.3 < trainer.callback_metrics["training/locality_valid_ratio"] < 1.0


def test_cluster_mode_without_cluster_ids_says_what_to_add(tmp_path):
    model, data = toy("cluster_neighborhood", samples_per_cluster=0)
    with pytest.raises(KeyError, match="add the ClusterAssignment callback"):
        quiet_trainer(1, tmp_path, limit_train_batches=1, limit_val_batches=0).fit(model, data)


def test_resume_is_exact(tmp_path):
    """Interrupted after epoch 0 of 3 and resumed == uninterrupted: weights, optimizer, the time and
    partner draws, and the clusters (recomputed at epoch 2)."""

    def run(root, interrupt=None, ckpt_path=None):
        L.seed_everything(0)
        model, data = toy("cluster_neighborhood", num_train=512)
        callbacks = [ModelCheckpoint(dirpath=root / "checkpoints", save_last=True), RandomState(),
                     ClusterAssignment(num_clusters=6, every_n_epochs=2)]
        callbacks += [StopAfterEpoch(interrupt)] if interrupt is not None else []
        trainer = quiet_trainer(3, root, callbacks, limit_val_batches=0)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, trainer

    straight, straight_trainer = run(tmp_path / "straight")
    run(tmp_path / "resumed", interrupt=0)
    resumed, resumed_trainer = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    assert resumed_trainer.global_step == straight_trainer.global_step == 3 * 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_cpu_profiles_fit_and_validate_from_the_command_line(tmp_path):
    root = tmp_path / "toy"
    cli("fit", "--config", "configs/cluster_flow_toy.yaml", "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.num_eval", "200")
    assert (root / "checkpoints" / "last.ckpt").exists()
    cli("validate", "--config", "configs/cluster_flow_toy.yaml", "--trainer.default_root_dir", str(root),
        "--data.init_args.num_eval", "200", "--ckpt_path", "last")
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["validate"]["val/w2_nfe16"] == pytest.approx(metrics["fit"]["val/w2_nfe16"], rel=1e-5)
    # two ranks each score half the held-out set; gathered, the scores are the one-process ones
    cli("validate", "--config", "configs/cluster_flow_toy.yaml", "--trainer.default_root_dir", str(root),
        "--data.init_args.num_eval", "200", "--ckpt_path", "last", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    two_ranks = json.loads((root / "metrics.json").read_text())["validate"]
    for name in ("val/w2_nfe1", "val/w2_nfe16", "val/mmd2_nfe4", "val/straightness"):
        assert two_ranks[name] == pytest.approx(metrics["validate"][name], rel=1e-4), name
    cli("predict", "--config", "configs/cluster_flow_toy.yaml", "--trainer.default_root_dir", str(root),
        "--data.init_args.num_eval", "200", "--ckpt_path", "last")
    rows = (root / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,x0,x1" and len(rows) == 201


def test_spec_sized_digits_config_runs_a_step(tmp_path):
    result = cli("fit", "--config", "configs/cluster_flow.yaml", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                 "false", "--model.init_args.eval_nfe", "[1, 2]")
    assert "k-means: 100 clusters of 1438 items" in result.stderr + result.stdout


@pytest.mark.parametrize("mode", ["none", "random_perturbation"])
def test_training_step_reads_the_items_flow_times_and_noise(mode):
    """The step uses ``batch["t"]`` and, for the perturbation, ``batch["noise"]`` (per-item draws of the data)."""
    torch.manual_seed(0)
    model, _ = toy(mode, locality_noise_scale=0.5)
    x0, x1, t = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    batch = {"x0": x0, "x": x1, "t": t, "noise": torch.zeros(6, 2), "index": torch.arange(6)}
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        expected = ((model.velocity((1 - t[:, None]) * x0 + t[:, None] * x1, t) - (x1 - x0)) ** 2).mean()
    # zero noise: the partner path is the sample's own, so the locality term is exactly 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    if mode == "random_perturbation":
        batch["noise"] = torch.ones(6, 2)
        assert model.training_step(batch, 0).item() > loss.item()


@pytest.mark.parametrize("mode", ["none", "cluster_neighborhood"])
def test_bf16_mixed_fit_gives_finite_metrics(tmp_path, mode):
    L.seed_everything(0)
    model, data = toy(mode, samples_per_cluster=0)
    callbacks = [ClusterAssignment(num_clusters=8)] if mode == "cluster_neighborhood" else []
    trainer = quiet_trainer(1, tmp_path, callbacks, limit_train_batches=3, limit_val_batches=1,
                            precision="bf16-mixed")
    trainer.fit(model, data)
    for name in ("training/loss_epoch", "val/w2_nfe8", "val/mmd2_nfe8", "val/straightness"):
        assert torch.isfinite(trainer.callback_metrics[name]), name
