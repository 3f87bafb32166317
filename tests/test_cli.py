"""The command line end to end, in subprocesses: fit, test, resume, config printing, 2-process DDP."""

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, REPO, TINY_TEMI


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([PYTHON, str(REPO / "cli.py"), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def blob_args(blob_files, root, batch_size=32, epochs=3) -> list[str]:
    args = ["--config", "configs/temi.yaml", "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
            "--data.init_args.embeddings", str(blob_files["embeddings"]),
            "--data.init_args.labels", str(blob_files["labels"]),
            "--data.init_args.knn", "5", "--data.init_args.batch_size", str(batch_size)]
    for name, value in TINY_TEMI.items():
        args += [f"--model.init_args.{name}", str(value)]
    return args


def test_fit_test_and_resume_leave_checkpoints_and_metrics(blob_files, tmp_path):
    root = tmp_path / "run"
    cli("fit", *blob_args(blob_files, root), "--trainer.check_val_every_n_epoch", "2")
    checkpoints = {p.name for p in (root / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) >= 2  # last and best
    # validated after epoch 1 only, yet last.ckpt holds the final epoch
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    assert (root / "config.yaml").exists()
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["fit"]["val/acc"] > 0.5 and "train/loss_epoch" in metrics["fit"]

    cli("validate", *blob_args(blob_files, root), "--ckpt_path", "last")
    cli("test", *blob_args(blob_files, root), "--ckpt_path", "last")
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics) == {"fit", "validate", "test"}
    assert metrics["validate"]["val/acc"] > 0.5
    assert metrics["test"]["test/acc"] == pytest.approx(metrics["validate"]["val/acc"])  # same data and weights

    cli("predict", *blob_args(blob_files, root), "--ckpt_path", "last")
    rows = (root / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,cluster,confidence" and len(rows) == 1 + 160

    cli("fit", *blob_args(blob_files, root, epochs=5), "--ckpt_path", "last")
    resumed = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 4 and resumed["global_step"] == 5 * 5


def test_print_config_and_composed_configs():
    printed = cli("fit", "--config", "configs/temi.yaml", "--config", "configs/profiles/temi_cpu.yaml", "--print_config").stdout
    assert "modules.temi.TEMIClustering" in printed
    assert "datamodules.EmbeddingsDataModule" in printed
    # the profile's values override the method config's (knn 50 -> 20, momentum 0.996 -> 0.9)
    assert "knn: 20" in printed and "teacher_momentum: 0.9\n" in printed and "beta: 0.6" in printed
    spec = cli("fit", "--config", "configs/temi_spec.yaml", "--print_config").stdout
    assert "pair_loss: spec" in spec and "entropy_weight: 5.0" in spec and "heads: spec" in spec


def test_two_process_ddp_matches_one_process(blob_files, tmp_path):
    """Same global batch (2 x 16 vs 1 x 32), same seed: the same weights within float tolerance."""
    cli("fit", *blob_args(blob_files, tmp_path / "one", batch_size=32))
    cli("fit", *blob_args(blob_files, tmp_path / "two", batch_size=16), "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    one = torch.load(tmp_path / "one/checkpoints/last.ckpt", weights_only=False)
    two = torch.load(tmp_path / "two/checkpoints/last.ckpt", weights_only=False)
    assert one["global_step"] == two["global_step"] == 15
    rank_local = {"epoch_head_loss"}  # each rank sums its own half; only the reduced mean is used
    for name, value in one["state_dict"].items():
        if name in rank_local:
            continue
        assert torch.allclose(value.float(), two["state_dict"][name].float(), atol=1e-4, rtol=1e-3), name
    metrics_one = json.loads((tmp_path / "one/metrics.json").read_text())["fit"]
    metrics_two = json.loads((tmp_path / "two/metrics.json").read_text())["fit"]
    assert metrics_two["val/acc"] == pytest.approx(metrics_one["val/acc"], abs=1e-6)
    assert metrics_two["val/clusters_used"] == metrics_one["val/clusters_used"]


def test_a_checkpoint_loads_when_the_data_exposes_a_link_its_model_does_not_take(tmp_path):
    """TinyData exposes batch_size, TinyModule takes no batch_size: the link is stored in the
    checkpoint's hyperparameters all the same, and validate --ckpt_path must not pass it on."""
    args = ["--model", "tests.tiny_module.TinyModule", "--data", "tests.tiny_module.TinyData",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false"]
    cli("fit", *args)
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["batch_size"] == 2
    cli("validate", *args, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"))
    assert "val/loss" in json.loads((tmp_path / "metrics.json").read_text())["validate"]
