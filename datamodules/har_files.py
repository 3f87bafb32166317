"""Readers of labelled IMU windows: the raw UCI HAR layout and ``.npz`` window archives (issue 10).

The UCI HAR layout (Anguita et al., ESANN 2013) holds one text file per channel and split, one
window per line (128 samples at 50 Hz)::

    activity_labels.txt                            # "1 WALKING", one label per line
    {split}/y_{split}.txt                          # the 1-based label id of each window
    {split}/subject_{split}.txt                    # optional: the subject of each window
    {split}/Inertial Signals/{body_acc,body_gyro,total_acc}_{x,y,z}_{split}.txt

A window archive is an ``.npz`` with ``windows [N, C, T]``, ``labels [N]`` (indices into
``label_names [L]``), optional ``subjects [N]`` and ``channel_names [C]``; a folder of them holds
one ``{split}.npz`` per split. Every error names the file and the line, row or key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clustering.features import nonfinite_rows

UCI_SIGNALS = ("body_acc", "body_gyro", "total_acc")
UCI_CHANNELS = [f"{signal}_{axis}" for signal in UCI_SIGNALS for axis in "xyz"]


@dataclass
class WindowSet:
    """Windows of one split with their activity labels, as written in the files."""

    signals: torch.Tensor  # float32 [N, C, T]
    labels: torch.Tensor  # int64 [N], indices into label_names
    label_names: list[str]
    subjects: torch.Tensor | None  # int64 [N]
    channel_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.signals)


# ---- the UCI HAR text layout ------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():  # a trailing newline or blank lines end many files
        lines.pop()
    return lines


def _signal_rows(path: Path) -> np.ndarray:
    """One window per line ``[N, T]``; rows of another length, non-numbers, NaN or inf are refused."""
    rows = []
    for number, line in enumerate(_lines(path), start=1):
        try:
            rows.append(np.array(line.split(), dtype=np.float32))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not a number ({error})") from None
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"{path}, line {number}: {len(rows[-1])} values, but line 1 has {len(rows[0])}")
    if not rows:
        raise ValueError(f"{path}: holds no windows")
    values = np.stack(rows)
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if len(bad):
        raise ValueError(f"{path}, line {bad[0] + 1}: NaN or inf sample ({len(bad)} such lines)")
    return values


def _integers(path: Path) -> np.ndarray:
    """One integer per line ``[N]``."""
    values = []
    for number, line in enumerate(_lines(path), start=1):
        try:
            values.append(int(line))
        except ValueError:
            raise ValueError(f"{path}, line {number}: expected one integer, found {line.strip()!r}") from None
    return np.array(values, dtype=np.int64)


def read_activity_labels(path: Path) -> dict[int, str]:
    """``activity_labels.txt``: label id -> name, in the order of the file."""
    names: dict[int, str] = {}
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
            raise ValueError(f"{path}, line {number}: expected '<id> <NAME>', found {line.strip()!r}")
        if int(parts[0]) in names:
            raise ValueError(f"{path}, line {number}: label id {parts[0]} given twice")
        names[int(parts[0])] = parts[1].strip()
    if not names:
        raise ValueError(f"{path}: holds no labels")
    return names


def _label_indices(path: Path, ids: np.ndarray, names: dict[int, str], labels_path: Path) -> np.ndarray:
    """Label ids of the y file as indices into the names' order."""
    position = {label_id: index for index, label_id in enumerate(names)}
    unknown = np.flatnonzero(~np.isin(ids, list(names)))
    if len(unknown):
        line = unknown[0]
        raise ValueError(f"{path}, line {line + 1}: label id {ids[line]} is not in {labels_path} "
                         f"(ids {sorted(names)})")
    return np.array([position[label_id] for label_id in ids.tolist()], dtype=np.int64)


def _check_same_shapes(arrays: dict[Path, np.ndarray]) -> None:
    """Every file must hold as many lines (and the signal files as many samples per line) as the first."""
    (first_path, first), *others = arrays.items()
    for path, values in others:
        if len(values) != len(first):
            raise ValueError(f"{path} has {len(values)} lines but {first_path} has {len(first)}; "
                             "the files of one split must hold one line per window")
        if values.ndim == 2 and values.shape[1] != first.shape[1]:
            raise ValueError(f"{path}, line 1: {values.shape[1]} values, but {first_path} has "
                             f"{first.shape[1]} per line")


def read_uci_har(root: str | Path, split: str) -> WindowSet:
    """The ``split`` of a UCI HAR folder: 9 channels (body_acc, body_gyro, total_acc; x, y, z each)."""
    root = Path(root)
    folder = root / split
    labels_path = root / "activity_labels.txt"
    names = read_activity_labels(labels_path)
    signals = {folder / "Inertial Signals" / f"{channel}_{split}.txt": None for channel in UCI_CHANNELS}
    missing = [str(path) for path in signals if not path.is_file()]
    if missing:
        raise ValueError(f"missing signal file(s) of split {split!r}: {', '.join(missing)}")
    signals = {path: _signal_rows(path) for path in signals}
    y_path, subject_path = folder / f"y_{split}.txt", folder / f"subject_{split}.txt"
    ids = _integers(y_path)
    subjects = _integers(subject_path) if subject_path.is_file() else None
    _check_same_shapes(signals | {y_path: ids} | ({subject_path: subjects} if subjects is not None else {}))
    return WindowSet(
        signals=torch.from_numpy(np.stack(list(signals.values()), axis=1)),
        labels=torch.from_numpy(_label_indices(y_path, ids, names, labels_path)),
        label_names=list(names.values()),
        subjects=torch.from_numpy(subjects) if subjects is not None else None,
        channel_names=list(UCI_CHANNELS),
        source=f"{root} ({split})",
    )


# ---- window archives --------------------------------------------------------------------------
def _integer_column(archive: dict, key: str, num_rows: int, path: Path) -> np.ndarray:
    values = archive[key]
    if values.shape != (num_rows,) or values.dtype.kind not in "iu":
        raise ValueError(f"{path}: {key!r} must be integers of shape ({num_rows},) (one per window), "
                         f"got {values.dtype} {values.shape}")
    return values.astype(np.int64)


def _names(archive: dict, key: str, count: int, path: Path) -> list[str]:
    values = archive[key]
    if values.ndim != 1 or values.dtype.kind not in "US" or (count >= 0 and len(values) != count):
        expected = f"({count},)" if count >= 0 else "[L]"
        raise ValueError(f"{path}: {key!r} must be strings of shape {expected}, "
                         f"got {values.dtype} {values.shape}")
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values.tolist()]


def read_window_archive(path: str | Path) -> WindowSet:
    """Windows of one ``.npz`` archive (keys in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            archive = dict(loaded)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: could not be read as an .npz archive ({error})") from error
    missing = [key for key in ("windows", "labels", "label_names") if key not in archive]
    if missing:
        raise ValueError(f"{path}: lacks {missing} (found {sorted(archive)})")
    windows = archive["windows"]
    if windows.ndim != 3 or windows.dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'windows' must be numbers of shape [N, C, T], "
                         f"got {windows.dtype} {windows.shape}")
    signals = torch.from_numpy(windows.astype(np.float32))
    bad = nonfinite_rows(signals)
    if len(bad):
        raise ValueError(f"{path}: 'windows' rows {bad[:5].tolist()} hold NaN or inf ({len(bad)} rows)")
    label_names = _names(archive, "label_names", -1, path)
    labels = _integer_column(archive, "labels", len(windows), path)
    outside = np.flatnonzero((labels < 0) | (labels >= len(label_names)))
    if len(outside):
        raise ValueError(f"{path}: 'labels' row {outside[0]} is {labels[outside[0]]}, outside the "
                         f"{len(label_names)} label_names")
    num_channels = windows.shape[1]
    channels = (_names(archive, "channel_names", num_channels, path) if "channel_names" in archive
                else [f"channel_{index}" for index in range(num_channels)])
    subjects = _integer_column(archive, "subjects", len(windows), path) if "subjects" in archive else None
    return WindowSet(signals, torch.from_numpy(labels), label_names,
                     torch.from_numpy(subjects) if subjects is not None else None, channels, str(path))


# ---- either layout ----------------------------------------------------------------------------
def read_windows(source: str | Path, split: str) -> WindowSet:
    """The ``split`` of ``source``: a UCI HAR folder, a folder of ``{split}.npz``, or one ``.npz`` for it."""
    source = Path(source)
    uci_labels, uci_signals, archive = (source / "activity_labels.txt", source / split / "Inertial Signals",
                                        source / f"{split}.npz")
    if uci_labels.is_file() and uci_signals.is_dir():
        return read_uci_har(source, split)
    if archive.is_file():
        return read_window_archive(archive)
    if source.is_file() and source.suffix == ".npz":
        return read_window_archive(source)
    raise ValueError(f"{source}: no windows of split {split!r}; looked for a UCI HAR folder ({uci_labels} "
                     f"and {uci_signals}), a window archive {archive}, or an .npz file given as the source")
