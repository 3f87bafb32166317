"""TEMIClustering: learning happens, bad steps are skipped, the last layer starts frozen, resume is exact."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.random_state import RandomState
from datamodules.embeddings import EmbeddingsDataModule
from modules.temi import TEMIClustering
from tests.conftest import TINY_TEMI, quiet_trainer


class EpochLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(trainer.callback_metrics["train/loss_epoch"].item())


def blob_module(blob_files, batch_size=32, **overrides):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["labels"]),
                                knn=5, batch_size=batch_size, seed=0)
    model = TEMIClustering(input_dim=data.input_dim, num_clusters=data.num_clusters, num_classes=data.num_classes,
                           batch_size=batch_size, **(TINY_TEMI | overrides))
    return model, data


def test_smoke_fit_learns_clusters(blob_files, tmp_path):
    L.seed_everything(0)
    model, data = blob_module(blob_files)
    losses = EpochLosses()
    quiet_trainer(12, tmp_path, [losses], enable_checkpointing=False).fit(model, data)
    metrics = quiet_trainer(1, tmp_path, enable_checkpointing=False).validate(model, data, verbose=False)[0]
    assert losses.losses[-1] < losses.losses[0] - 0.3
    assert metrics["val/acc"] > 0.9  # chance is about 0.3 for 4 balanced clusters
    assert metrics["val/clusters_used"] >= 3
    assert "val/head3/nmi" in metrics and 0 <= metrics["val/best_head"] < 4


class TeacherModes(Callback):
    """The teacher's and the student's training flags at every training step."""

    def __init__(self):
        self.teacher, self.student = set(), set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.teacher |= {m.training for m in pl_module.teacher.modules()}
        self.student |= {m.training for m in pl_module.student.modules()}


def test_teacher_stays_in_eval_mode_while_the_student_trains(blob_files, tmp_path):
    """Spec heads have dropout and batch norm: a training-mode teacher would drop units from its
    targets and normalize by batch statistics instead of the student's copied running ones."""
    L.seed_everything(0)
    model, data = blob_module(blob_files, heads="spec")
    modes = TeacherModes()
    quiet_trainer(2, tmp_path, [modes], enable_checkpointing=False, num_sanity_val_steps=2).fit(model, data)
    assert modes.teacher == {False} and modes.student == {True}


def test_last_layer_is_frozen_during_the_first_epoch(blob_files, tmp_path):
    L.seed_everything(0)
    model, data = blob_module(blob_files, freeze_last_layer_epochs=1)
    initial = [p.clone() for p in model.student.last_layer.parameters()]
    first_layer = [p.clone() for p in model.student.parameters()][0]
    quiet_trainer(1, tmp_path, enable_checkpointing=False).fit(model, data)
    assert all(torch.equal(a, b) for a, b in zip(initial, model.student.last_layer.parameters()))
    assert not torch.equal(first_layer, next(model.student.parameters()))
    quiet_trainer(2, tmp_path, enable_checkpointing=False).fit(model, data)
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.student.last_layer.parameters()))


def test_non_finite_loss_skips_the_step_and_stops_after_a_streak(blob_files):
    model, data = blob_module(blob_files, max_nonfinite_steps=3)
    x = torch.full((8, data.input_dim), float("nan"))
    batch = {"x": x, "x_pair": x}
    marginal = model.marginal.clone()
    for step in range(2):
        model.training_step(batch, step)
        assert model.step_skipped
    assert torch.equal(model.marginal, marginal)  # a skipped step changes no state
    assert model.nonfinite_total.item() == 2 and model.epoch_steps.item() == 0
    good = torch.randn(8, data.input_dim)
    assert torch.isfinite(model.training_step({"x": good, "x_pair": good}, 2))
    assert not model.step_skipped and model.nonfinite_streak.item() == 0 and model.epoch_steps.item() == 1
    for step in range(2):
        model.training_step(batch, 3 + step)
    model.check_nonfinite_streak()  # two in a row: still running
    model.training_step(batch, 5)
    with pytest.raises(FloatingPointError, match="NaN or inf for 3 steps in a row"):
        model.check_nonfinite_streak()


class PoisonBatch(Callback):
    """Turns the inputs of one training batch of the first epoch into NaN and records the weights around it."""

    def __init__(self, batch_idx: int):
        self.batch_idx, self.before, self.after = batch_idx, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (0, self.batch_idx):
            batch["x"].fill_(float("nan"))
            self.before = {name: t.clone() for name, t in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (0, self.batch_idx):
            self.after = {name: t.clone() for name, t in pl_module.state_dict().items()}


@pytest.mark.parametrize("heads", ["temi", "spec"])
def test_a_non_finite_step_in_a_fit_leaves_weights_teacher_and_optimizer_unchanged(blob_files, tmp_path, heads):
    """Decided on the device: fused AdamW skips the update, the teacher and p(k) stay, training goes on."""
    L.seed_everything(0)
    model, data = blob_module(blob_files, heads=heads, freeze_last_layer_epochs=0)
    poison = PoisonBatch(batch_idx=2)
    trainer = quiet_trainer(2, tmp_path, [poison], enable_checkpointing=False)
    trainer.fit(model, data)
    changed = {name for name in poison.before if not torch.equal(poison.before[name], poison.after[name])}
    # only the counters move (spec heads' batch-norm statistics too are restored)
    counters = {"nonfinite_streak", "nonfinite_longest_streak", "nonfinite_total", "epoch_steps", "epoch_head_loss"}
    assert changed <= counters, changed
    assert model.nonfinite_total.item() == 1 and model.nonfinite_streak.item() == 0
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {trainer.global_step - 1}  # the skipped step did not count in AdamW's bias correction
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])  # training went on


@pytest.mark.parametrize("heads", ["temi", "spec"])
def test_resume_is_exact(blob_files, tmp_path, heads):
    """Stopped after epoch 2 of 4 and resumed == uninterrupted (weights, teacher, p(k), optimizer, metrics)."""
    overrides = {"heads": heads} if heads == "temi" else {"heads": "spec", "hidden_dim": 64, "dropout": 0.2}

    def run(root, epochs, ckpt_path=None):
        L.seed_everything(0)
        model, data = blob_module(blob_files, **overrides)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
        fit_trainer = quiet_trainer(epochs, root, [checkpoint, RandomState()])
        fit_trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, fit_trainer

    straight, straight_trainer = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed, resumed_trainer = run(tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "resumed/checkpoints/last.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    opt_a = straight_trainer.optimizers[0].state_dict()["state"]
    opt_b = resumed_trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    for name in ("val/acc", "val/nmi", "train/loss_epoch"):
        assert straight_trainer.callback_metrics[name] == resumed_trainer.callback_metrics[name], name


def test_learning_rate_scales_with_the_global_batch_and_warms_up_in_epochs(blob_files, tmp_path):
    """lr per 256 items (batch 32: x 1/8); warmup_epochs=1 is one epoch of 5 steps; min_lr_factor 1: flat after."""
    model, data = blob_module(blob_files, lr=2e-3, min_lr_factor=1.0, warmup_epochs=1)
    lrs = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(3, tmp_path, [Record()], enable_checkpointing=False, limit_val_batches=0).fit(model, data)
    peak = 2e-3 * 32 / 256
    assert lrs[:6] == pytest.approx([0.0, peak / 5, 2 * peak / 5, 3 * peak / 5, 4 * peak / 5, peak])
    assert lrs[-1] == pytest.approx(peak)


def test_bf16_mixed_fit_gives_finite_metrics(blob_files, tmp_path):
    L.seed_everything(0)
    model, data = blob_module(blob_files)
    trainer = quiet_trainer(2, tmp_path, enable_checkpointing=False, precision="bf16-mixed")
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_epoch"]) and 0 <= metrics["val/acc"] <= 1
    assert model.nonfinite_total.item() == 0 and model.epoch_head_loss.dtype == torch.float32
