"""The command line end to end, in subprocesses: fit, test, resume, config printing, 2-process DDP."""

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time

import pytest
import torch
import yaml

from tests.conftest import PYTHON, REPO, TINY_TEMI

CLI_ENV = os.environ | {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The CLI with its output on pipes, as in a batch job: progress as one line per validation."""
    result = subprocess.run([PYTHON, str(REPO / "cli.py"), *args], cwd=REPO, env=CLI_ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def cli_in_terminal(*args: str, timeout: int = 300) -> str:
    """The CLI with its output on a terminal of 150 columns, as a user runs it: the progress bar on.
    Returns what the terminal received."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    process = subprocess.Popen([PYTHON, str(REPO / "cli.py"), *args], cwd=REPO, env=CLI_ENV,
                               stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    received, deadline = bytearray(), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 1 << 16)
                except OSError:  # every process holding the terminal has exited
                    break
                received += chunk
        else:
            process.kill()
    finally:
        os.close(controller)
    output = received.decode(errors="replace").replace("\r", "\n")
    assert process.wait(timeout=30) == 0, output[-3000:]
    return output


def blob_args(blob_files, root, batch_size=32, epochs=3) -> list[str]:
    args = ["--config", "configs/temi.yaml", "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", str(epochs),
            "--data.init_args.embeddings", str(blob_files["embeddings"]),
            "--data.init_args.labels", str(blob_files["labels"]),
            "--data.init_args.knn", "5", "--data.init_args.batch_size", str(batch_size)]
    for name, value in TINY_TEMI.items():
        args += [f"--model.init_args.{name}", str(value)]
    return args


def test_fit_test_and_resume_leave_checkpoints_and_metrics(blob_files, tmp_path):
    root = tmp_path / "run"
    fit = cli("fit", *blob_args(blob_files, root), "--trainer.check_val_every_n_epoch", "2")
    # no terminal: no bar, one line for the one validation (after epoch 1, 2 x 5 steps)
    lines = [line for line in fit.stdout.splitlines() if line.startswith("validation ")]
    assert len(lines) == 1 and lines[0].startswith("validation step=10 epoch=1 ") and " val/acc=" in lines[0]
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
    assert "class_path: datamodules." in printed and "EmbeddingsDataModule" in printed
    # the profile's values override the method config's (knn 50 -> 20, momentum 0.996 -> 0.9)
    assert "knn: 20" in printed and "teacher_momentum: 0.9\n" in printed and "beta: 0.6" in printed
    spec = cli("fit", "--config", "configs/temi_spec.yaml", "--print_config").stdout
    assert "pair_loss: spec" in spec and "entropy_weight: 5.0" in spec and "heads: spec" in spec


def test_two_process_ddp_matches_one_process(blob_files, tmp_path):
    """Same global batch (2 x 16 vs 1 x 32), same seed: the same weights within float tolerance.
    Both run on a terminal, with the progress bar a user has, whose epoch-end read of the
    epoch-level metrics used to run a reduce on rank 0 alone and abort the DDP run."""
    cli_in_terminal("fit", *blob_args(blob_files, tmp_path / "one", batch_size=32))
    shown = cli_in_terminal("fit", *blob_args(blob_files, tmp_path / "two", batch_size=16), "--trainer.strategy",
                            "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert "Epoch 2: 100%" in shown and "train/loss_epoch=" in shown  # the bar, with the reduced epoch loss
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
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    cli("fit", *args)
    checkpoint = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["batch_size"] == 2
    cli("validate", *args, "--ckpt_path", str(tmp_path / "checkpoints/last.ckpt"))
    assert "val/loss" in json.loads((tmp_path / "metrics.json").read_text())["validate"]


@pytest.mark.parametrize("signal_name, exit_status", [("SIGTERM", 128 + 15), ("SIGINT", 1)])
def test_an_interrupt_mid_epoch_saves_last_and_the_resumed_fit_ends_with_the_straight_weights(
        blob_files, tmp_path, signal_name, exit_status):
    """A scheduler's SIGTERM or a Ctrl-C (SIGINT) after step 7 of a TEMI fit (batch 2 of 5 in epoch 1)
    leaves last.ckpt at that step; `--ckpt_path last` then ends where the uninterrupted fit ends."""
    preemption = tmp_path / "preemption.yaml"
    preemption.write_text("trainer:\n  callbacks:\n    - class_path: tests.tiny_module.SignalAtStep\n"
                          f"      init_args: {{step: 7, signal_name: {signal_name}}}\n")
    cli("fit", *blob_args(blob_files, tmp_path / "straight"))
    split = tmp_path / "split"
    # A process inherits an ignored SIGINT, and Python then leaves it ignored; a pytest worker can hold one (Lightning,
    # for one, ignores SIGINT while it shuts down after a KeyboardInterrupt), so the run starts as a terminal's would.
    interrupted = subprocess.run([PYTHON, str(REPO / "cli.py"), "fit", *blob_args(blob_files, split),
                                  "--config", str(preemption)],
                                 check=False, cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the run's own output on failure
    assert interrupted.returncode == exit_status and f"sending {signal_name} at step 7" in interrupted.stdout, (
        interrupted.returncode, interrupted.stdout[-3000:], interrupted.stderr[-3000:])
    saved = torch.load(split / "checkpoints/last.ckpt", weights_only=False)
    assert saved["global_step"] == 7
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_yielded": 2}]
    cli("fit", *blob_args(blob_files, split), "--ckpt_path", "last")
    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=False)
    resumed = torch.load(split / "checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 15
    for name, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), resumed["state_dict"][name].float(), atol=1e-5, rtol=0), name
    first_weight = next(name for name in straight["state_dict"] if name.startswith("student."))
    assert not torch.allclose(straight["state_dict"][first_weight], saved["state_dict"][first_weight])


def test_a_truncated_last_checkpoint_fails_the_resume_with_its_file_named(tmp_path):
    args = ["--model", "tests.tiny_module.TinyModule", "--data", "tests.tiny_module.TinyData",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.max_epochs", "1"]
    cli("fit", *args)
    saved = (tmp_path / "checkpoints/last.ckpt").resolve()
    saved.write_bytes(saved.read_bytes()[:1000])
    resumed = subprocess.run([PYTHON, str(REPO / "cli.py"), "fit", *args, "--trainer.max_epochs", "2",
                              "--ckpt_path", "last"], check=False, cwd=REPO, env=CLI_ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode != 0
    assert f"cannot read checkpoint {tmp_path / 'checkpoints/last.ckpt'}" in resumed.stderr


def other_method_args(method: str, tmp_path) -> list[str]:
    """Tiny runs of the other methods: cluster flow on the 2-D toy (with its k-means callback), and
    P1 (priors only: a readout without a loss must not stall DDP) and P2 (contrastive text encoder),
    each with its phase gate."""
    if method == "cluster_flow_toy":
        return ["--config", "configs/cluster_flow_toy.yaml", "--trainer.limit_train_batches", "4",
                "--trainer.check_val_every_n_epoch", "1", "--data.init_args.num_eval", "200"]
    from tests.test_visual_latent import TINY_DATA, TINY_MODEL

    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "model": {"init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_MODEL.items()}},
        "data": {"init_args": TINY_DATA},
        "trainer": {"callbacks": [str(REPO / f"configs/gates/{method[:2]}.yaml")], "limit_train_batches": 2},
    }))
    return ["--config", f"configs/{method}.yaml", "--config", str(tiny)]


@pytest.mark.parametrize("method", ["cluster_flow_toy", "p1_priors", "p2_contrastive"])
def test_the_other_methods_fit_under_two_process_ddp_with_the_progress_bar(method, tmp_path):
    shown = cli_in_terminal("fit", *other_method_args(method, tmp_path), "--trainer.default_root_dir",
                            str(tmp_path / "run"), "--trainer.logger", "false", "--trainer.max_epochs", "2",
                            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    assert "Epoch 1: 100%" in shown
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)["epoch"] == 1
