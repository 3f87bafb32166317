"""Phase gates (spec 004, P1 "Pass/Fail Criteria" and P2 "Pass when"): named conditions on validation metrics
that decide whether a phase has passed, reported in ``DIR/gate_report.json``.

A criterion reads one metric from ``trainer.callback_metrics`` at every validation and compares it:

- ``op: ">" | ">=" | "<" | "<="`` against a number ``threshold``;
- ``op: between`` against ``threshold: [lo, hi]``, both ends included;
- ``op: plateau``: the relative spread ``(max - min) / max(|mean|, eps)`` of the metric over the last
  ``consecutive`` (>= 2) evaluations is at most ``threshold``.

A comparison passes once it held at each of the last ``consecutive`` evaluations; a plateau passes while its
window of ``consecutive`` evaluations is full and flat. The gate passes when every criterion passes. The P1
gate in a LightningCLI config::

    trainer:
      callbacks:
        - class_path: callbacks.phase_gate.PhaseGate
          init_args:
            phase: P1
            criteria:
              # >= 4 of 6 channels with alpha in [1.5, 2.5] for 3 consecutive evaluations
              - {name: spectrum_alpha, metric: val/channels_alpha_in_range, op: ">=", threshold: 4,
                 consecutive: 3}
              # TV plateaus and is non-zero
              - {name: tv_plateau, metric: val/tv, op: plateau, threshold: 0.1, consecutive: 3}
              - {name: tv_nonzero, metric: val/tv, op: ">", threshold: 1.0e-3}
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from callbacks.json_files import finite_or_none, write_json_atomically

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
OPERATORS = (*COMPARISONS, "between", "plateau")
# A metric that plateaus at zero would otherwise divide by zero.
PLATEAU_EPS = 1e-8


@dataclass
class GateCriterion:
    """One pass condition on a logged metric; the module docstring gives the grammar."""

    name: str
    metric: str
    op: Literal[">", ">=", "<", "<=", "between", "plateau"]
    threshold: float | list[float]
    consecutive: int = 1

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"criterion {self.name!r}: op must be one of {OPERATORS}, got {self.op!r}")
        if self.consecutive < 1:
            raise ValueError(f"criterion {self.name!r}: consecutive must be >= 1, got {self.consecutive}")
        if self.op == "between":
            self.threshold = self._bounds()
        elif isinstance(self.threshold, (list, tuple)):
            raise ValueError(f"criterion {self.name!r}: op {self.op!r} needs one number as threshold, "
                             f"got {self.threshold!r}")
        else:
            self.threshold = float(self.threshold)
        if self.op == "plateau" and (self.consecutive < 2 or self.threshold < 0):
            raise ValueError(f"criterion {self.name!r}: plateau needs consecutive >= 2 and threshold >= 0, "
                             f"got consecutive={self.consecutive}, threshold={self.threshold}")

    def _bounds(self) -> list[float]:
        if not isinstance(self.threshold, (list, tuple)) or len(self.threshold) != 2:
            raise ValueError(f"criterion {self.name!r}: op 'between' needs threshold [lo, hi], "
                             f"got {self.threshold!r}")
        low, high = (float(bound) for bound in self.threshold)
        if not low <= high:
            raise ValueError(f"criterion {self.name!r}: op 'between' needs lo <= hi, got {self.threshold!r}")
        return [low, high]

    @property
    def required_streak(self) -> int:
        # A plateau's window already spans `consecutive` evaluations, so one flat window is enough.
        return 1 if self.op == "plateau" else self.consecutive


def relative_spread(values: Sequence[float], eps: float = PLATEAU_EPS) -> float:
    """``(max - min) / max(|mean|, eps)`` of a plateau window (module docstring); NaN if any value is NaN."""
    if len(values) == 0:
        raise ValueError("values must not be empty")
    window = torch.tensor(values, dtype=torch.float64)
    return float((window.max() - window.min()) / window.mean().abs().clamp_min(eps))


def criterion_holds(criterion: GateCriterion, window: Sequence[float]) -> bool:
    """Whether ``criterion`` holds at the latest evaluation, given the metric's last ``consecutive`` values
    (oldest first). A NaN value never holds."""
    if len(window) == 0 or len(window) > criterion.consecutive:
        raise ValueError(f"criterion {criterion.name!r}: window must hold 1 to {criterion.consecutive} "
                         f"values, got {len(window)}")
    if criterion.op == "plateau":
        return len(window) == criterion.consecutive and relative_spread(window) <= criterion.threshold
    if criterion.op == "between":
        low, high = criterion.threshold
        return low <= window[-1] <= high
    return COMPARISONS[criterion.op](window[-1], criterion.threshold)


class PhaseGate(Callback):
    """Evaluates the criteria of one phase after every validation, logs ``gate/<name>`` and ``gate/passed``
    (1.0 or 0.0) and writes ``default_root_dir/filename`` on rank 0.

    Reads the metrics in ``on_validation_end`` because callbacks' ``on_validation_epoch_end`` runs before the
    module's, which may still log the metrics a criterion needs. Streaks advance only while fitting; a
    ``validate`` run reports whether each criterion holds on its metrics next to the streaks restored from
    the checkpoint. The gate values also enter ``trainer.callback_metrics``, so a ``ModelCheckpoint`` (which
    Lightning runs after the other callbacks) can monitor ``gate/passed``.
    """

    def __init__(self, phase: str, criteria: list[GateCriterion], stop_when_passed: bool = False,
                 filename: str = "gate_report.json") -> None:
        if not criteria:
            raise ValueError(f"phase {phase!r}: criteria must not be empty")
        names = [criterion.name for criterion in criteria]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"phase {phase!r}: criterion names must be unique, repeated: {duplicates}")
        self.phase = phase
        self.criteria = criteria
        self.stop_when_passed = stop_when_passed
        self.filename = filename
        self.evaluations = 0
        self.streaks = {name: 0 for name in names}
        self.windows: dict[str, list[float]] = {name: [] for name in names}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(phase=self.phase)

    def passed(self) -> dict[str, bool]:
        return {criterion.name: self.streaks[criterion.name] >= criterion.required_streak
                for criterion in self.criteria}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values, windows, held = {}, {}, {}
        for criterion in self.criteria:
            values[criterion.name] = self._read(trainer, criterion)
            window = self.windows[criterion.name] + [values[criterion.name]]
            windows[criterion.name] = window[-criterion.consecutive:]
            held[criterion.name] = criterion_holds(criterion, windows[criterion.name])
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self._advance(windows, held)
        passed = self.passed()
        self._log(trainer, passed)
        if trainer.is_global_zero:
            self._write(trainer, values, held, passed)
        if fitting and self.stop_when_passed:
            self._stop_if_passed(trainer, all(passed.values()))

    def _read(self, trainer: L.Trainer, criterion: GateCriterion) -> float:
        metrics = trainer.callback_metrics
        if criterion.metric not in metrics:
            raise ValueError(f"phase {self.phase!r}, criterion {criterion.name!r}: metric "
                             f"{criterion.metric!r} was not logged; logged metrics: {sorted(metrics)}")
        return float(metrics[criterion.metric])

    def _advance(self, windows: dict[str, list[float]], held: dict[str, bool]) -> None:
        self.evaluations += 1
        self.windows = windows
        self.streaks = {name: self.streaks[name] + 1 if held[name] else 0 for name in self.streaks}

    def _log(self, trainer: L.Trainer, passed: dict[str, bool]) -> None:
        values = {f"gate/{name}": float(ok) for name, ok in passed.items()}
        values["gate/passed"] = float(all(passed.values()))
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _write(self, trainer: L.Trainer, values: dict[str, float], held: dict[str, bool],
               passed: dict[str, bool]) -> None:
        criteria = [
            {"name": criterion.name, "metric": criterion.metric, "op": criterion.op,
             "value": finite_or_none(values[criterion.name]), "threshold": criterion.threshold,
             "consecutive": criterion.consecutive, "held": held[criterion.name],
             "streak": self.streaks[criterion.name], "passed": passed[criterion.name]}
            for criterion in self.criteria
        ]
        report = {"phase": self.phase, "stage": trainer.state.fn.value, "passed": all(passed.values()),
                  "evaluations": self.evaluations, "epoch": trainer.current_epoch,
                  "global_step": trainer.global_step, "criteria": criteria}
        write_json_atomically(Path(trainer.default_root_dir) / self.filename, report)

    def _stop_if_passed(self, trainer: L.Trainer, passed: bool) -> None:
        # Every rank must take the same decision, or the ranks that keep training wait forever.
        if trainer.strategy.reduce_boolean_decision(passed, all=True):
            trainer.should_stop = True
            rank_zero_info(f"Phase {self.phase} gate passed after {self.evaluations} evaluations "
                           f"(epoch {trainer.current_epoch}, step {trainer.global_step}); stopping.")

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "criteria": {
            criterion.name: {"definition": asdict(criterion), "streak": self.streaks[criterion.name],
                             "window": list(self.windows[criterion.name])}
            for criterion in self.criteria}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues the saved streaks; a criterion whose definition changed since the save starts afresh."""
        self.evaluations = state_dict["evaluations"]
        for criterion in self.criteria:
            saved = state_dict["criteria"].get(criterion.name)
            if saved is not None and saved["definition"] == asdict(criterion):
                self.streaks[criterion.name] = saved["streak"]
                self.windows[criterion.name] = list(saved["window"])

