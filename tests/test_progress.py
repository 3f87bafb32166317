"""Progress without a terminal: one line per validation, with the main metrics and the gate's state."""

import pytest
import torch

from callbacks.progress import ValidationLines, main_metrics, validation_line
from tests.conftest import quiet_trainer
from tests.tiny_module import TinyModule


def test_validation_line_by_hand():
    metrics = {"val/acc": torch.tensor(0.123456), "gate/passed": 1.0, "train/loss_step": torch.tensor(-2.5)}
    assert validation_line(120, 3, metrics) == \
        "validation step=120 epoch=3 gate/passed=1 train/loss_step=-2.5 val/acc=0.1235"


def test_main_metrics_are_the_top_level_validation_and_gate_values():
    metrics = {"val/acc": 1, "val/head3/acc": 2, "gate/passed": 3, "gate/tv_plateau": 4, "train/loss": 5, "epoch": 6}
    assert main_metrics(metrics) == {"val/acc": 1, "gate/passed": 3, "gate/tv_plateau": 4}


def test_one_line_per_validation_with_its_step_and_metrics(tmp_path, capsys):
    trainer = quiet_trainer(2, tmp_path, callbacks=[ValidationLines()])
    trainer.fit(TinyModule())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("validation ")]
    # 4 points in batches of 2: steps 2 and 4; the sanity check prints nothing
    assert [line.split(" val/loss=")[0] for line in lines] == ["validation step=2 epoch=0",
                                                              "validation step=4 epoch=1"]
    assert float(lines[-1].split("val/loss=")[1]) == pytest.approx(float(trainer.callback_metrics["val/loss"]),
                                                                    rel=1e-3)
