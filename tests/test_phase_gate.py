"""PhaseGate on a tiny real Trainer whose module logs a scripted metric sequence, plus its pure helpers."""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

import callbacks.phase_gate
from callbacks.phase_gate import GateCriterion, PhaseGate, criterion_holds, relative_spread
from tests.tiny_module import TinyModule


class ScriptedMetrics(TinyModule):
    """Logs ``script[metric][current_epoch]`` in its own ``on_validation_epoch_end``, as a module does when a
    metric needs the whole validation epoch (spectra, retrieval)."""

    def __init__(self, script: dict[str, list[float]]) -> None:
        super().__init__()
        self.script = script

    def on_validation_epoch_end(self) -> None:
        for metric, values in self.script.items():
            self.log(metric, values[self.current_epoch])


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # a recorder of metrics only

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def gate(self, name: str) -> list[float]:
        return [row[f"gate/{name}"] for row in self.rows if f"gate/{name}" in row]


def make_trainer(root: Path, gate: PhaseGate, max_epochs: int) -> tuple[L.Trainer, RecordingLogger]:
    logger = RecordingLogger()
    trainer = L.Trainer(default_root_dir=root, max_epochs=max_epochs, limit_train_batches=1,
                        limit_val_batches=1, logger=logger, callbacks=[gate], accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        log_every_n_steps=1)
    return trainer, logger


def fit(root: Path, gate: PhaseGate, script: dict[str, list[float]]) -> tuple[L.Trainer, RecordingLogger]:
    trainer, logger = make_trainer(root, gate, max_epochs=len(next(iter(script.values()))))
    trainer.fit(ScriptedMetrics(script))
    return trainer, logger


def report(root: Path) -> dict[str, Any]:
    return json.loads((root / "gate_report.json").read_text())


def test_relative_spread_matches_hand_computation():
    assert relative_spread([1.0, 1.1, 0.9]) == pytest.approx(0.2 / 1.0)
    assert relative_spread([2.0, 4.0]) == pytest.approx(2.0 / 3.0)
    assert relative_spread([-1.0, -3.0]) == pytest.approx(2.0 / 2.0)
    assert relative_spread([0.0, 0.0]) == 0.0  # eps keeps a flat zero finite
    assert math.isnan(relative_spread([1.0, float("nan"), 2.0]))


def test_comparisons_and_between_at_their_bounds():
    def holds(op: str, threshold: float | list[float], value: float) -> bool:
        return criterion_holds(GateCriterion("c", "m", op, threshold), [value])

    assert not holds(">", 1.0, 1.0) and holds(">=", 1.0, 1.0) and holds(">", 1.0, 1.5)
    assert not holds("<", 1.0, 1.0) and holds("<=", 1.0, 1.0) and holds("<", 1.0, 0.5)
    assert holds("between", [1.5, 2.5], 1.5) and holds("between", [1.5, 2.5], 2.5)
    assert not holds("between", [1.5, 2.5], 1.499) and not holds("between", [1.5, 2.5], 2.501)
    assert not holds(">=", 1.0, float("nan")) and not holds("between", [1.5, 2.5], float("nan"))


def test_streak_passes_only_after_consecutive_holds_and_resets_on_a_miss(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("spectrum_alpha", "val/in_range", ">=", 4, consecutive=3)])
    _, logger = fit(tmp_path, gate, {"val/in_range": [4, 5, 3, 4, 4, 6]})
    # held: 1 1 0 1 1 1 -> streak 1 2 0 1 2 3
    assert logger.gate("spectrum_alpha") == [0, 0, 0, 0, 0, 1]
    assert logger.gate("passed") == [0, 0, 0, 0, 0, 1]
    written = report(tmp_path)
    # 6.0 is the value logged in the module's epoch end of the last evaluation, not a stale one
    assert written["criteria"][0]["value"] == 6.0 and written["criteria"][0]["streak"] == 3
    assert written["evaluations"] == 6  # the sanity check does not count


def test_between_is_inclusive_over_a_fit(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("alpha", "val/alpha", "between", [1.5, 2.5])])
    _, logger = fit(tmp_path, gate, {"val/alpha": [1.5, 2.5, 2.6, 1.4, 2.0]})
    assert logger.gate("alpha") == [1, 1, 0, 0, 1]


def test_plateau_needs_a_full_flat_window(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("tv_plateau", "val/tv", "plateau", 0.05, consecutive=3)])
    _, logger = fit(tmp_path, gate, {"val/tv": [10.0, 5.0, 5.2, 5.1, 6.0]})
    # windows: [10] [10 5] not full; [10 5 5.2] 5.2 / 6.73 = 0.77; [5 5.2 5.1] 0.2 / 5.1 = 0.039;
    # [5.2 5.1 6] 0.9 / 5.43 = 0.17
    assert logger.gate("tv_plateau") == [0, 0, 0, 1, 0]
    assert report(tmp_path)["criteria"][0]["streak"] == 0


def test_gate_passes_only_when_every_criterion_passes(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("high", "val/a", ">", 0.5),
                            GateCriterion("low", "val/b", "<", 0.5)])
    trainer, logger = fit(tmp_path, gate, {"val/a": [1.0, 1.0, 0.0], "val/b": [1.0, 0.0, 0.0]})
    assert logger.gate("high") == [1, 1, 0] and logger.gate("low") == [0, 1, 1]
    assert logger.gate("passed") == [0, 1, 0]
    assert trainer.callback_metrics["gate/passed"] == 0.0  # visible to callbacks that monitor it


def test_report_contents(tmp_path):
    gate = PhaseGate("P2", [GateCriterion("recall_at_1", "val/r1", ">=", 0.6, consecutive=2),
                            GateCriterion("gap", "val/gap", "between", [0.25, 2.0])], filename="p2_gate.json")
    fit(tmp_path, gate, {"val/r1": [0.7, 0.8], "val/gap": [0.3, float("nan")]})
    assert not (tmp_path / "gate_report.json").exists()
    written = json.loads((tmp_path / "p2_gate.json").read_text())
    assert written == {
        "phase": "P2", "stage": "fit", "passed": False, "evaluations": 2, "epoch": 1, "global_step": 2,
        "criteria": [
            {"name": "recall_at_1", "metric": "val/r1", "op": ">=", "value": pytest.approx(0.8),
             "threshold": 0.6, "consecutive": 2, "held": True, "streak": 2, "passed": True},
            {"name": "gap", "metric": "val/gap", "op": "between", "value": None, "threshold": [0.25, 2.0],
             "consecutive": 1, "held": False, "streak": 0, "passed": False},
        ],
    }
    assert not list(tmp_path.glob("*.partial"))


def test_stop_when_passed_ends_the_fit_early(tmp_path, caplog):
    gate = PhaseGate("P1", [GateCriterion("up", "val/a", ">", 0.5, consecutive=2)], stop_when_passed=True)
    with caplog.at_level(logging.INFO):
        trainer, logger = fit(tmp_path, gate, {"val/a": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]})
    assert logger.gate("passed") == [0, 0, 1]
    assert gate.evaluations == 3 and trainer.global_step == 3  # of 8 epochs of one step
    assert report(tmp_path)["passed"] is True
    assert "Phase P1 gate passed after 3 evaluations" in caplog.text


def test_validate_reports_but_does_not_advance_streaks(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("up", "val/a", ">", 0.5, consecutive=2)])
    trainer, _ = make_trainer(tmp_path, gate, max_epochs=2)
    model = ScriptedMetrics({"val/a": [1.0, 1.0, 0.0]})  # validate runs at current_epoch 2
    trainer.fit(model)
    assert report(tmp_path)["passed"] is True
    trainer.validate(model, verbose=False)
    written = report(tmp_path)
    assert written["stage"] == "validate" and written["evaluations"] == 2
    assert written["criteria"][0]["held"] is False and written["criteria"][0]["value"] == 0.0
    assert written["criteria"][0]["streak"] == 2 and written["passed"] is True
    assert gate.streaks == {"up": 2}


def test_missing_metric_names_the_metric_the_criterion_and_the_logged_ones(tmp_path):
    gate = PhaseGate("P1", [GateCriterion("tv_nonzero", "val/total_variation", ">", 1e-3)])
    with pytest.raises(ValueError, match=r"'tv_nonzero'.*'val/total_variation'.*val/loss.*val/tv"):
        fit(tmp_path, gate, {"val/tv": [1.0]})


@pytest.mark.parametrize("criterion, message", [
    (dict(op="=>", threshold=1.0), "op must be one of"),
    (dict(op="between", threshold=1.0), r"needs threshold \[lo, hi\]"),
    (dict(op="between", threshold=[1.0, 2.0, 3.0]), r"needs threshold \[lo, hi\]"),
    (dict(op="between", threshold=[2.5, 1.5]), "lo <= hi"),
    (dict(op=">", threshold=[1.0, 2.0]), "needs one number"),
    (dict(op="plateau", threshold=0.1, consecutive=1), "consecutive >= 2"),
    (dict(op="plateau", threshold=-0.1, consecutive=3), "threshold >= 0"),
    (dict(op=">", threshold=1.0, consecutive=0), "consecutive must be >= 1"),
])
def test_invalid_criteria_are_rejected_naming_the_criterion(criterion, message):
    with pytest.raises(ValueError, match=f"criterion 'bad'.*{message}"):
        GateCriterion(name="bad", metric="val/x", **criterion)


def test_duplicate_or_no_criteria_are_rejected():
    twice = [GateCriterion("tv", "val/tv", ">", 0.0), GateCriterion("tv", "val/tv", "<", 1.0)]
    with pytest.raises(ValueError, match=r"repeated: \['tv'\]"):
        PhaseGate("P1", twice)
    with pytest.raises(ValueError, match="criteria must not be empty"):
        PhaseGate("P1", [])


def test_resumed_fit_continues_streaks_exactly(tmp_path):
    def criteria() -> list[GateCriterion]:
        return [GateCriterion("up", "val/a", ">", 0.5, consecutive=3),
                GateCriterion("flat", "val/a", "plateau", 0.2, consecutive=3)]

    script = {"val/a": [1.0, 1.0, 1.1, 1.0, 0.0, 1.0]}
    whole = PhaseGate("P1", criteria())
    _, whole_logger = fit(tmp_path / "whole", whole, script)

    first = PhaseGate("P1", criteria())
    trainer, first_logger = make_trainer(tmp_path / "parts", first, max_epochs=3)
    trainer.fit(ScriptedMetrics(script))
    trainer.save_checkpoint(tmp_path / "parts" / "three.ckpt")
    second = PhaseGate("P1", criteria())
    trainer, second_logger = make_trainer(tmp_path / "parts", second, max_epochs=6)
    trainer.fit(ScriptedMetrics(script), ckpt_path=tmp_path / "parts" / "three.ckpt")

    for name in ("up", "flat"):
        assert first_logger.gate(name) + second_logger.gate(name) == whole_logger.gate(name)
    assert whole_logger.gate("up") == [0, 0, 1, 1, 0, 0]  # the resumed part needs the saved streak
    assert whole_logger.gate("flat") == [0, 0, 1, 1, 0, 0]  # and the saved window
    assert second.state_dict() == whole.state_dict()


def test_state_dict_round_trip_and_changed_definitions_start_afresh():
    saved = PhaseGate("P1", [GateCriterion("kept", "val/a", ">", 0.5, 3),
                             GateCriterion("changed", "val/b", "<", 1.0, 3)])
    saved.evaluations = 4
    saved.streaks = {"kept": 2, "changed": 1}
    saved.windows = {"kept": [1.0, 2.0], "changed": [0.5]}
    restored = PhaseGate("P1", [GateCriterion("kept", "val/a", ">", 0.5, 3),
                                GateCriterion("changed", "val/b", "<", 2.0, 3)])
    restored.load_state_dict(saved.state_dict())
    assert restored.evaluations == 4
    assert restored.streaks == {"kept": 2, "changed": 0}
    assert restored.windows == {"kept": [1.0, 2.0], "changed": []}


def test_each_phase_has_its_own_checkpoint_state():
    criteria = [GateCriterion("tv", "val/tv", ">", 0.0)]
    assert PhaseGate("P1", criteria).state_key != PhaseGate("P2", criteria).state_key


def test_the_documented_yaml_builds_the_gate_as_lightning_cli_would():
    documented = yaml.safe_load(textwrap.dedent(callbacks.phase_gate.__doc__.split("::", 1)[1]))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])  # the type of trainer.callbacks
    config = parser.parse_object({"callbacks": documented["trainer"]["callbacks"]})
    gate = parser.instantiate(config).callbacks[0]
    assert isinstance(gate, PhaseGate) and gate.phase == "P1" and gate.stop_when_passed is False
    assert gate.criteria == [
        GateCriterion("spectrum_alpha", "val/channels_alpha_in_range", ">=", 4.0, consecutive=3),
        GateCriterion("tv_plateau", "val/tv", "plateau", 0.1, consecutive=3),
        GateCriterion("tv_nonzero", "val/tv", ">", 1e-3),
    ]
    between = {"class_path": "callbacks.phase_gate.PhaseGate", "init_args": {"phase": "P1", "criteria": [
        {"name": "alpha", "metric": "val/alpha", "op": "between", "threshold": [1.5, 2.5]}]}}
    gate = parser.instantiate(parser.parse_object({"callbacks": [between]})).callbacks[0]
    assert gate.criteria[0].threshold == [1.5, 2.5]
    between["init_args"]["criteria"][0]["op"] = "=>"
    with pytest.raises(Exception, match="=>"):
        parser.parse_object({"callbacks": [between]})
