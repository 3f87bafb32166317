"""IMU windows with the text of their activity labels: the data of IMU-text alignment (spec 002, issue 10).

Sources (``datamodules.har_files``): a UCI HAR folder, a folder of ``{train,test}.npz`` window
archives, or one ``.npz``. The training source's ``train`` split is cut into ``train`` and ``val``
(whole subjects held out when the files name them, else a stratified draw), its ``test`` split is
the evaluation, unless ``eval_data_dir`` names another dataset whose ``test`` split replaces it.

Labels are matched by text, never by id: every label name becomes its canonical text
(``text.activity_text``), and the global label table holds the training labels in the order of the
training file, then the labels only the evaluation data has. ``holdout_activities`` removes
activities from ``train`` and ``val`` and keeps them in ``test`` (protocol B: zero-shot on
activities never seen in training). Each label has several descriptions
(``text.describe_activity``), embedded once by a frozen sentence encoder
(``text.sentence_embeddings``); the label's embedding is the unit-length mean of its descriptions'.

Windows are normalized per channel with the training split's statistics, which travel in the
datamodule's checkpoint state, so an evaluation from a checkpoint normalizes as training did.
Optional stationary-wavelet detail bands are appended as channels before that.

Training batches carry, per item and drawn once per epoch by the index loader (so resume and DDP see
the same draws): ``description`` (one of the label's descriptions, uniformly) and the augmentation
draws, applied on the device in ``gather``: one rotation per window for all its xyz triads and an
amplitude scale (both in the files' units), then jitter in normalized units.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import ClassVar

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import RunningStage

from datamodules.har_files import WindowSet, read_windows
from datamodules.index_batches import IndexBatchLoader, ItemDraw
from datamodules.index_tables import TRAIN_VAL_TEST_SPLITS, IndexTablesDataModule, Tables
from text.activity_text import activity_text, describe_activity
from text.sentence_embeddings import embed_sentences

STD_FLOOR = 1e-6  # a constant channel (a dead sensor axis) is centred, not blown up
SPLITS = ("train", "val", "test")
STAGE_NEEDS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


def band_names(names: list[str], levels: int) -> list[str]:
    """Channel names with their wavelet bands', level 1 (finest) first; ``swt{level}_{name}`` keeps the
    channel's axis letter last, so triads stay triads."""
    return names + [f"swt{level}_{name}" for level in range(1, levels + 1) for name in names]


def wavelet_bands(signals: torch.Tensor, wavelet: str, levels: int, source: str) -> torch.Tensor:
    """``signals [N, C, T]`` with the detail bands of ``pywt.swt`` appended in the order of ``band_names``:
    ``[N, C * (1 + levels), T]``."""
    if levels == 0:
        return signals
    length = signals.shape[-1]
    if length % 2**levels:
        raise ValueError(f"{source}: wavelet_levels={levels} needs a window length divisible by {2**levels}; "
                         f"the windows have {length} samples")
    # [(cA_n, cD_n), ..., (cA_1, cD_1)]
    coefficients = pywt.swt(signals.numpy(), wavelet, level=levels, axis=-1)
    details = [torch.from_numpy(np.asarray(detail, dtype=np.float32)) for _, detail in reversed(coefficients)]
    return torch.cat([signals, *details], dim=1)


def random_rotations(num: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` rotations ``[num, 3, 3]`` uniform on SO(3): QR of a Gaussian matrix with the signs of R's
    diagonal moved into Q (Haar on O(3), Mezzadri 2007), a reflected one turned back by one column."""
    q, r = torch.linalg.qr(torch.randn(num, 3, 3, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q[:, :, 0] *= torch.linalg.det(q).unsqueeze(-1)
    return q


def subject_split(subjects: torch.Tensor, fraction: float, seed: int, source: str) -> torch.Tensor:
    """Which windows are validation ``[N] bool``: a seeded choice of whole subjects, as many as bring
    their windows' share nearest ``fraction`` (at least one subject, never all)."""
    ids, counts = subjects.unique(return_counts=True)
    if len(ids) < 2:
        raise ValueError(f"{source}: every window comes from subject {ids.tolist()}; validation holds out "
                         "whole subjects, so it needs at least two (or drop the subjects to split by label)")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    held = counts[order].cumsum(0)[:-1]
    take = int((held - fraction * len(subjects)).abs().argmin()) + 1
    return torch.isin(subjects, ids[order[:take]])


def stratified_split(labels: torch.Tensor, fraction: float, seed: int, source: str) -> torch.Tensor:
    """Which windows are validation ``[N] bool``: ``fraction`` of each label's, drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    try:
        _, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels.numpy(),
                                   random_state=seed)
    except ValueError as error:
        raise ValueError(f"{source}: cannot hold out val_fraction={fraction} of every label for validation "
                         f"({error})") from error
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[torch.from_numpy(held)] = True
    return is_val


class IMUTextDataModule(IndexTablesDataModule):
    """IMU windows ``[N, C, T]``, their global label ids, and the label texts' embeddings.

    Args:
        data_dir: training source (``datamodules.har_files.read_windows``); its ``test`` split is the
            default evaluation.
        eval_data_dir: another source whose ``test`` split replaces the test split; its labels are
            matched to the training ones by canonical text, new ones appended to the label table.
        holdout_activities: activity names, matched by canonical text, removed from train and val
            but kept in test (zero-shot on unseen activities).
        val_fraction: share of the training windows held out for validation (whole subjects when
            the files name them).
        batch_size, eval_batch_size: per device.
        seed: seeds the validation split, the epoch orders and the per-item draws; ``None``: the
            global seed of ``seed_everything``.
        scale_sigma: per-window amplitude factor ``1 + scale_sigma * N(0, 1)``; 0: off.
        jitter_sigma: additive Gaussian noise in normalized units; 0: off.
        rotate: one uniform random 3-D rotation per window, for all its xyz channel triads alike.
        wavelet, wavelet_levels: ``pywt.swt`` detail bands of every channel, appended as channels
            (computed once, before normalization); 0 levels: off.
        sentence_model: local sentence-transformers folder; ``None``: the packaged all-MiniLM-L6-v2.
        text_cache_dir: where the description embeddings are cached.
    """

    STAGE_SPLITS: ClassVar[dict[RunningStage | None, str]] = TRAIN_VAL_TEST_SPLITS

    def __init__(
        self,
        data_dir: str,
        eval_data_dir: str | None = None,
        holdout_activities: Sequence[str] = (),
        val_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        seed: int | None = None,
        scale_sigma: float = 0.0,
        jitter_sigma: float = 0.0,
        rotate: bool = False,
        wavelet: str = "db4",
        wavelet_levels: int = 0,
        sentence_model: str | None = None,
        text_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.resolve_data_seed()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        for name, sigma in (("scale_sigma", scale_sigma), ("jitter_sigma", jitter_sigma)):
            if sigma < 0:
                raise ValueError(f"{name} must be at least 0, got {sigma}")
        if wavelet_levels < 0:
            raise ValueError(f"wavelet_levels must be at least 0, got {wavelet_levels}")
        if wavelet_levels:
            pywt.Wavelet(wavelet)  # an unknown name fails here, naming pywt.wavelist()
        self._stats: dict | None = None  # channel statistics: computed from train, or restored

    def __str__(self) -> str:
        hp = self.hparams
        sizes = ", ".join(f"{split}={len(self._splits[split][1])}" for split in SPLITS)
        evaluation = f", eval_data_dir={hp.eval_data_dir!r}" if hp.eval_data_dir else ""
        return (f"{type(self).__name__}(data_dir={hp.data_dir!r}{evaluation}, windows {sizes}, "
                f"channels={self.num_channels}, length={self.window_length}, labels={self.num_labels})")

    # ---- what the model is linked to -------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def window_length(self) -> int:
        return self._files[0].signals.shape[-1]

    @property
    def text_dim(self) -> int:
        return self.description_embeddings.shape[1]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_train_items(self) -> int:
        return len(self._splits["train"][1])

    # ---- files ---------------------------------------------------------------------------------
    @cached_property
    def _files(self) -> tuple[WindowSet, WindowSet]:
        """The training source's train split and the evaluation source's test split, as read."""
        hp = self.hparams
        train = read_windows(hp.data_dir, "train")
        test = read_windows(hp.eval_data_dir or hp.data_dir, "test")
        if test.channel_names != train.channel_names or test.signals.shape[-1] != train.signals.shape[-1]:
            raise ValueError(f"{test.source} has channels {test.channel_names} of {test.signals.shape[-1]} "
                             f"samples, but {train.source} has {train.channel_names} "
                             f"of {train.signals.shape[-1]}")
        return train, test

    @cached_property
    def channel_names(self) -> list[str]:
        """The files' channels, then their wavelet bands."""
        return band_names(self._files[0].channel_names, self.hparams.wavelet_levels)

    def _signals(self, windows: WindowSet) -> torch.Tensor:
        hp = self.hparams
        return wavelet_bands(windows.signals, hp.wavelet, hp.wavelet_levels, windows.source)

    # ---- the label table -------------------------------------------------------------------
    @cached_property
    def _label_table(self) -> tuple[list[str], list[torch.Tensor]]:
        """Canonical texts of all labels, and per file the global id of each of its label names."""
        ids: dict[str, int] = {}
        file_ids = [torch.tensor([ids.setdefault(activity_text(name), len(ids)) for name in file.label_names],
                                 dtype=torch.long) for file in self._files]
        return list(ids), file_ids

    @property
    def label_names(self) -> list[str]:
        """Canonical label texts, indexed by global label id."""
        return self._label_table[0]

    @cached_property
    def holdout_label_ids(self) -> torch.Tensor:
        ids = {text: index for index, text in enumerate(self.label_names)}
        unknown = [name for name in self.hparams.holdout_activities if activity_text(name) not in ids]
        if unknown:
            raise ValueError(f"holdout_activities {unknown} match no label; "
                             f"the labels are {self.label_names}")
        return torch.tensor(sorted({ids[activity_text(name)] for name in self.hparams.holdout_activities}),
                            dtype=torch.long)

    @cached_property
    def seen_label_ids(self) -> torch.Tensor:
        """Labels of the train split (after the holdout), sorted."""
        return self._splits["train"][1].unique()

    @cached_property
    def unseen_label_ids(self) -> torch.Tensor:
        """Labels of the test split that the train split lacks, sorted."""
        test = self._splits["test"][1].unique()
        return test[~torch.isin(test, self.seen_label_ids)]

    # ---- splits: rows of the files, raw windows (with wavelet bands), global label ids -------------
    @cached_property
    def _rows(self) -> dict[str, torch.Tensor]:
        """Per split, the indices of its windows in its file (train and val: the training file's train
        split without the held-out activities; test: the evaluation file's test split)."""
        hp = self.hparams
        train, test = self._files
        labels = self._label_table[1][0][train.labels]
        kept = (~torch.isin(labels, self.holdout_label_ids)).nonzero().flatten()
        if len(kept) == 0:  # everything held out: setup names the empty train split
            is_val = torch.zeros(0, dtype=torch.bool)
        elif train.subjects is not None:
            is_val = subject_split(train.subjects[kept], hp.val_fraction, hp.seed, train.source)
        else:
            is_val = stratified_split(labels[kept], hp.val_fraction, hp.seed, train.source)
        return {"train": kept[~is_val], "val": kept[is_val], "test": torch.arange(len(test))}

    @cached_property
    def _splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        train, test = self._files
        train_ids, test_ids = self._label_table[1]
        training_file = self._signals(train), train_ids[train.labels]
        evaluation_file = self._signals(test), test_ids[test.labels]
        files = {"train": training_file, "val": training_file, "test": evaluation_file}
        return {split: (windows[self._rows[split]], labels[self._rows[split]])
                for split, (windows, labels) in files.items()}

    def split_rows(self, split: str) -> torch.Tensor:
        """Indices ``[N]`` of ``split``'s windows in the file they come from, in the order of its tables."""
        return self._rows[split]

    def split_labels(self, split: str) -> torch.Tensor:
        """Global label ids ``[N]`` of ``split``'s windows, in the order of its tables."""
        return self._splits[split][1]

    # ---- channel statistics, from the train split, kept in the checkpoint ------------------------
    def channel_stats(self) -> dict[str, list]:
        """Per-channel ``mean`` and ``std`` (floored at ``STD_FLOOR``) over the train split's windows and
        time steps, with the channel ``names``; restored from the checkpoint when one was read."""
        if self._stats is None:
            windows = self._splits["train"][0].double()
            std, mean = torch.std_mean(windows.transpose(0, 1).flatten(1), dim=1)
            self._stats = {"names": list(self.channel_names), "mean": mean.float().tolist(),
                           "std": std.clamp_min(STD_FLOOR).float().tolist()}
        return {name: list(values) for name, values in self._stats.items()}

    def state_dict(self) -> dict:
        return super().state_dict() | {"channel_stats": self.channel_stats()}

    def load_state_dict(self, state_dict: dict) -> None:
        """The loader place (see the base) and the channel statistics training normalized with."""
        super().load_state_dict(state_dict)
        stats = state_dict.get("channel_stats")
        if stats is None:
            return
        if list(stats["names"]) != self.channel_names:
            raise ValueError(f"the checkpoint's channel statistics are for channels {list(stats['names'])}, "
                             f"but the data has {self.channel_names}")
        self._stats = {name: list(values) for name, values in stats.items()}
        self.clear_device_tables()  # tables normalized with other statistics

    # ---- label descriptions and their embeddings -----------------------------------------------
    @cached_property
    def _description_table(self) -> tuple[list[str], torch.Tensor]:
        per_label = [describe_activity(name) for name in self.label_names]
        counts = torch.tensor([len(descriptions) for descriptions in per_label])
        return ([text for descriptions in per_label for text in descriptions],
                torch.repeat_interleave(torch.arange(len(per_label)), counts))

    @property
    def descriptions(self) -> list[str]:
        """Every label's descriptions, label by label (each label's first is its canonical text)."""
        return self._description_table[0]

    @property
    def description_labels(self) -> torch.Tensor:
        """Global label id of each description ``[M]``."""
        return self._description_table[1]

    @cached_property
    def description_embeddings(self) -> torch.Tensor:
        """Unit rows ``[M, D]`` of the frozen sentence encoder, cached in ``text_cache_dir`` when given."""
        hp = self.hparams
        return embed_sentences(self.descriptions, model_path=hp.sentence_model, cache_dir=hp.text_cache_dir)

    @cached_property
    def label_embeddings(self) -> torch.Tensor:
        """Per label, the unit-length mean of its descriptions' embeddings ``[L, D]``."""
        embeddings, labels = self.description_embeddings, self.description_labels
        sums = torch.zeros(self.num_labels, embeddings.shape[1]).index_add_(0, labels, embeddings)
        return F.normalize(sums, dim=1)

    # ---- tables and batches ----------------------------------------------------------------
    def host_tables(self, split: str) -> Tables:
        """Per split ``window`` (normalized) and ``label``; besides, the per-description ``text``
        embeddings (table ``descriptions``) and the per-channel ``mean``/``std`` (table ``channels``)."""
        if split == "descriptions":
            return {"text": self.description_embeddings}
        stats = self.channel_stats()
        mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
        if split == "channels":
            return {"mean": mean, "std": std}
        if split not in SPLITS:
            raise ValueError(f"no split {split!r}; the splits are {SPLITS}")
        windows, labels = self._splits[split]
        return {"window": (windows - mean[:, None]) / std[:, None], "label": labels}

    def training_draw(self) -> ItemDraw:
        """Per item and epoch: a ``description`` of its label, and the draws of the augmentations in use."""
        hp = self.hparams
        labels = self._splits["train"][1]
        per_label = torch.bincount(self.description_labels, minlength=self.num_labels)
        first = per_label.cumsum(0) - per_label
        shape = (self.num_channels, self.window_length)
        if hp.rotate:
            self._check_triads()

        def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
            if num_items != len(labels):
                raise ValueError(f"drawing for {num_items} items, but the train split has {len(labels)}")
            count = per_label[labels]
            choice = (torch.rand(num_items, generator=generator, dtype=torch.float64) * count).long()
            drawn = {"description": first[labels] + torch.minimum(choice, count - 1)}
            if hp.scale_sigma > 0:
                drawn["scale"] = 1 + hp.scale_sigma * torch.randn(num_items, generator=generator)
            if hp.rotate:
                drawn["rotation"] = random_rotations(num_items, generator)
            if hp.jitter_sigma > 0:
                drawn["jitter"] = hp.jitter_sigma * torch.randn(num_items, *shape, generator=generator)
            return drawn

        return draw

    def gather(self, batch: dict, split: str) -> dict:
        """Evaluation: ``window`` and ``label`` of the batch's items. Training also: the augmented
        ``window`` and ``text``, the embedding of each item's drawn ``description``."""
        if "window" in batch:  # already materialized (e.g. a batch built by hand)
            return batch
        index = batch["index"]
        tables = self.device_tables(split, index.device)
        gathered = batch | {"window": tables["window"][index], "label": tables["label"][index]}
        if "description" not in batch:
            return gathered
        texts = self.device_tables("descriptions", index.device)["text"]
        return gathered | {"window": self._augmented(gathered["window"], batch),
                           "text": texts[batch["description"]]}

    def _augmented(self, window: torch.Tensor, batch: dict) -> torch.Tensor:
        """Rotation and scale in the files' units (a rotation of normalized axes would not be one of the
        sensor), then jitter in normalized units."""
        if "rotation" in batch or "scale" in batch:
            stats = self.device_tables("channels", window.device)
            mean, std = stats["mean"][:, None], stats["std"][:, None]
            raw = window * std + mean
            if "rotation" in batch:
                size, channels, length = raw.shape
                triads = raw.view(size, channels // 3, 3, length)
                rotated = torch.einsum("bij,bkjt->bkit", batch["rotation"], triads)
                raw = rotated.reshape(size, channels, length)
            if "scale" in batch:
                raw = raw * batch["scale"][:, None, None]
            window = (raw - mean) / std
        return window + batch["jitter"] if "jitter" in batch else window

    # ---- setup and loaders -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        hp = self.hparams
        for split in STAGE_NEEDS[stage]:
            if len(self._splits[split][1]) == 0:
                raise ValueError(f"the {split} split holds no windows (data_dir={hp.data_dir!r}, "
                                 f"eval_data_dir={hp.eval_data_dir!r}, "
                                 f"holdout_activities={list(hp.holdout_activities)}, "
                                 f"val_fraction={hp.val_fraction})")

    def _check_triads(self) -> None:
        names = self.channel_names
        if len(names) % 3 or any(name[-1:].lower() != "xyz"[index % 3] for index, name in enumerate(names)):
            raise ValueError(f"rotate=True turns consecutive (x, y, z) channel triads, but the channels are "
                             f"{names}; name them ending in x, y, z (an archive's channel_names)")

    def train_dataloader(self) -> IndexBatchLoader:
        return self.train_loader(self.num_train_items, self.training_draw())

    def val_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._splits["val"][1]))

    def test_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._splits["test"][1]))

    predict_dataloader = test_dataloader
