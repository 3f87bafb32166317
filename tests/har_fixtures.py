"""Small labelled IMU windows written in the real layouts: UCI HAR text folders and ``.npz`` archives.

Classes are separable by construction: label ``k`` oscillates at ``1 + k`` Hz on every channel,
with a label- and channel-dependent offset, a random phase and a little noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.har_files import UCI_CHANNELS

SAMPLE_RATE = 50.0  # Hz, as UCI HAR


def class_windows(labels: np.ndarray, num_channels: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Windows ``[N, C, T]`` float32 whose frequency and offsets tell their label."""
    labels = np.asarray(labels)[:, None, None]
    channel = np.arange(num_channels)[None, :, None]
    time = np.arange(length)[None, None, :] / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi, (len(labels), num_channels, 1))
    offset = 0.2 * labels * (1 + channel % 3)
    amplitude = 0.5 + 0.1 * channel
    noise = 0.05 * rng.normal(size=(len(labels), num_channels, length))
    return (offset + amplitude * np.sin(2 * np.pi * (1 + labels) * time + phase) + noise).astype(np.float32)


def balanced_labels(num: int, num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` label indices, as even over the labels as ``num`` allows, in random order."""
    return rng.permutation(np.arange(num) % num_labels)


def _write_lines(path: Path, rows) -> None:
    path.write_text("".join(line + "\n" for line in rows))


def write_uci_har(
    root: str | Path,
    num_train: int = 60,
    num_test: int = 30,
    labels: Sequence[str] = ("WALKING", "SITTING", "LAYING"),
    subjects: bool = True,
    seed: int = 0,
    length: int = 128,
    num_subjects: int = 6,
) -> Path:
    """A UCI HAR folder (``activity_labels.txt``, ``{train,test}/Inertial Signals/*.txt``, ``y_*.txt``,
    optionally ``subject_*.txt``) with balanced labels; training windows come from subjects
    ``1..num_subjects``, test windows from as many others. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    _write_lines(root / "activity_labels.txt",
                 (f"{index} {name}" for index, name in enumerate(labels, start=1)))
    for split, num, first_subject in (("train", num_train, 1), ("test", num_test, num_subjects + 1)):
        folder = root / split / "Inertial Signals"
        folder.mkdir(parents=True, exist_ok=True)
        label_index = balanced_labels(num, len(labels), rng)
        windows = class_windows(label_index, len(UCI_CHANNELS), length, rng)
        for channel, name in enumerate(UCI_CHANNELS):
            _write_lines(folder / f"{name}_{split}.txt",
                         (" ".join(f"{value:.7e}" for value in row) for row in windows[:, channel]))
        _write_lines(root / split / f"y_{split}.txt", (str(index + 1) for index in label_index))
        if subjects:
            subject = first_subject + np.arange(num) * num_subjects // num
            _write_lines(root / split / f"subject_{split}.txt", (str(value) for value in subject))
    return root


def write_window_npz(
    path: str | Path,
    num: int = 30,
    label_names: Sequence[str] = ("WALKING", "SITTING", "LAYING"),
    num_channels: int = 9,
    length: int = 128,
    subjects: int = 0,
    channel_names: Sequence[str] | None = tuple(UCI_CHANNELS),
    seed: int = 0,
) -> Path:
    """A window archive: ``windows [num, C, T]``, ``labels`` (balanced), ``label_names``, ``channel_names``
    (unless None) and, with ``subjects > 0``, ``subjects`` in ``0..subjects - 1``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = balanced_labels(num, len(label_names), rng)
    entries = {"windows": class_windows(labels, num_channels, length, rng), "labels": labels.astype(np.int64),
               "label_names": np.array(label_names)}
    if channel_names is not None:
        entries["channel_names"] = np.array(channel_names)
    if subjects:
        entries["subjects"] = np.arange(num) * subjects // num
    np.savez(path, **entries)
    return path
