"""Precomputed embeddings with kNN pairs: the data side of TEMI (spec 003).

Sources, in order of precedence:

* ``folder``: the official TEMI layout (``embeddings.pt``, ``label.pt``, ``knn.pt`` and the
  optional ``-test`` files), as written by ``python -m tools.image_embeddings``;
* ``embeddings`` (+ optional ``labels``, ``test_embeddings``, ``test_labels``): ``.npy``,
  ``.npz`` or ``.pt`` files;
* nothing: scikit-learn's digits (1,797 images of 8x8 pixels, 10 classes), shipped inside the
  package, so the default runs offline.

Without a test split, validation and test evaluate on the training embeddings, the usual
transductive protocol of deep clustering. Embeddings are held as tensors and moved once to the
module's device; batches carry indices and are gathered there (``datamodules.index_tables``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from clustering.knn import check_k, cosine_knn
from datamodules.arrays import (
    archive_keys,
    as_embeddings,
    as_labels,
    as_neighbors,
    load_array,
    temi_folder_paths,
)
from datamodules.index_batches import IndexBatchLoader, neighbour_draw
from datamodules.index_tables import IndexTablesDataModule, Tables

Split = Literal["train", "test"]


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.data).float(), torch.from_numpy(digits.target).long()


class EmbeddingsDataModule(IndexTablesDataModule):
    """Embeddings ``[N, D]``, optional labels ``[N]``, and each item's ``knn`` cosine neighbours.

    Args:
        folder: official TEMI embedding folder.
        embeddings, labels: array files; ``.npz`` and dict ``.pt`` files are read by key
            (``embeddings_key``, ``labels_key``), and a labels key found next to the embeddings
            is used when ``labels`` is not given.
        test_embeddings, test_labels: optional held-out split for validation and test.
        num_clusters: number of clusters; defaults to the number of label classes.
        knn: neighbours per item from which TEMI draws its pair (official default 50).
        knn_backend: ``"auto"`` (faiss when installed), ``"faiss"`` or ``"torch"``.
        normalize: applied to the inputs the model sees (kNN always uses raw cosine):
            ``"standardize"`` with training mean/std (official ``--embed_norm``), ``"l2"``, ``"none"``.
        batch_size: per device, as everywhere in Lightning.
        seed: seeds the epoch permutations and neighbour draws (with the epoch number);
            ``None``: the global seed of ``seed_everything``.
    """

    def __init__(
        self,
        folder: str | None = None,
        embeddings: str | None = None,
        labels: str | None = None,
        test_embeddings: str | None = None,
        test_labels: str | None = None,
        embeddings_key: str = "embeddings",
        labels_key: str = "labels",
        num_clusters: int | None = None,
        knn: int = 50,
        knn_backend: Literal["auto", "faiss", "torch"] = "auto",
        normalize: Literal["none", "standardize", "l2"] = "none",
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        # The resolved config is logged whole; the data's derived values reach the model by links.
        self.save_hyperparameters(logger=False)
        self.resolve_data_seed()
        if folder is not None and embeddings is not None:
            raise ValueError("give either folder= (TEMI layout) or embeddings= (array file), not both")
        if labels is not None and embeddings is None:
            raise ValueError("labels= needs embeddings= (the array file the labels belong to)")

    def __str__(self) -> str:
        return f"{type(self).__name__}(source={self.source_name!r}, knn={self.hparams.knn})"

    # ---- what the model is linked to -------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return self.train_split["x"].shape[1]

    @property
    def num_clusters(self) -> int:
        if self.hparams.num_clusters is not None:
            self._check_num_clusters(self.hparams.num_clusters)
            return self.hparams.num_clusters
        labels = self.train_split.get("y")
        if labels is None:
            raise ValueError("these embeddings have no labels: set data.num_clusters to the number of clusters")
        return int(labels.max()) + 1

    @property
    def num_classes(self) -> int | None:
        """Number of label classes over both splits; ``None`` without labels."""
        labels = [split["y"] for split in (self.train_split, self.eval_split) if "y" in split]
        return max(int(y.max()) for y in labels) + 1 if labels else None

    def _check_num_clusters(self, num_clusters: int) -> None:
        num_items = len(self.train_split["x"])
        if not 1 < num_clusters <= num_items:
            raise ValueError(f"num_clusters={num_clusters} must lie in [2, {num_items}] (the number of embeddings)")

    # ---- loading ---------------------------------------------------------------------------
    @cached_property
    def train_split(self) -> dict[str, torch.Tensor]:
        return self._read_split("train")

    @cached_property
    def eval_split(self) -> dict[str, torch.Tensor]:
        split = self._read_split("test")
        return split if split else self.train_split

    @property
    def source_name(self) -> str:
        return self.hparams.folder or self.hparams.embeddings or "sklearn digits"

    def _read_split(self, split: Split) -> dict[str, torch.Tensor]:
        hp = self.hparams
        if hp.folder is not None:
            paths = temi_folder_paths(hp.folder, "" if split == "train" else "-test")
            x_path = paths["embeddings"]
            if split == "test" and not x_path.exists():
                return {}
            y_path = paths["label"] if paths["label"].exists() else None
            return self._validated(load_array(x_path), x_path, y_path and load_array(y_path), y_path)
        x_file = hp.embeddings if split == "train" else hp.test_embeddings
        y_file = hp.labels if split == "train" else hp.test_labels
        if x_file is None:
            if split == "test" or hp.embeddings is not None:
                return {}
            x, y = load_digits_arrays()
            return {"x": x, "y": y}
        x = load_array(x_file, hp.embeddings_key)
        y = None
        if y_file is not None:
            y = load_array(y_file, hp.labels_key)
        elif hp.labels_key in archive_keys(x_file):
            y_file, y = x_file, load_array(x_file, hp.labels_key)
        return self._validated(x, x_file, y, y_file)

    @staticmethod
    def _validated(x, x_source, y, y_source) -> dict[str, torch.Tensor]:
        split = {"x": as_embeddings(x, x_source)}
        if y is not None:
            split["y"] = as_labels(y, len(split["x"]), y_source, tuple(x.shape))
        return split

    # ---- kNN pairs, computed once and cached next to the embeddings --------------------------
    def knn_cache_path(self) -> Path | None:
        if self.hparams.folder is not None:
            return temi_folder_paths(self.hparams.folder)["knn"]
        if self.hparams.embeddings is not None:
            path = Path(self.hparams.embeddings)
            return path.with_name(f"{path.stem}.knn.pt")
        return None

    def prepare_data(self) -> None:
        """Rank 0 computes and caches the kNN table, so ranks never race on the file."""
        cache = self.knn_cache_path()
        if cache is not None and self._cached_neighbors(cache) is None:
            neighbors = self._compute_neighbors()
            try:
                torch.save(neighbors, cache)
            except OSError as error:
                rank_zero_warn(f"could not cache the kNN table at {cache} ({error}); it is recomputed each run")

    def _cached_neighbors(self, cache: Path) -> torch.Tensor | None:
        if not cache.exists():
            return None
        table = as_neighbors(load_array(cache), len(self.train_split["x"]), cache)
        return table[:, : self.hparams.knn] if table.shape[1] >= self.hparams.knn else None

    def _compute_neighbors(self) -> torch.Tensor:
        return cosine_knn(self.train_split["x"], self.hparams.knn, backend=self.hparams.knn_backend)

    @cached_property
    def neighbors(self) -> torch.Tensor:
        check_k(self.hparams.knn, len(self.train_split["x"]))
        cache = self.knn_cache_path()
        cached = self._cached_neighbors(cache) if cache is not None else None
        return cached if cached is not None else self._compute_neighbors()

    # ---- inputs as the model sees them -----------------------------------------------------
    @cached_property
    def _input_transform(self):
        mode = self.hparams.normalize
        if mode == "standardize":
            x = self.train_split["x"]
            mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
            return lambda t: (t - mean) / std
        if mode == "l2":
            return lambda t: F.normalize(t, dim=1)
        if mode == "none":
            return lambda t: t
        raise ValueError(f"normalize must be 'none', 'standardize' or 'l2', got {mode!r}")

    def setup(self, stage: str) -> None:
        if self.hparams.num_clusters is not None:
            self._check_num_clusters(self.hparams.num_clusters)
        if stage == "fit":
            self.neighbors  # noqa: B018 - fail early on a bad k, before training starts

    def train_dataloader(self) -> IndexBatchLoader:
        return self.train_loader(len(self.train_split["x"]), neighbour_draw(self.neighbors))

    def _eval_loader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self.eval_split["x"]))

    val_dataloader = test_dataloader = predict_dataloader = _eval_loader

    def host_tables(self, split: str) -> Tables:
        rows = self.train_split if split == "train" else self.eval_split
        return {"x": self._input_transform(rows["x"])} | ({"y": rows["y"]} if "y" in rows else {})

    def gather(self, batch: dict, split: str) -> dict:
        """Inputs ``x`` (and labels ``y``) of the batch's items, and ``x_pair`` of their drawn neighbours."""
        if "x" in batch:  # already materialized (e.g. a batch built by hand)
            return batch
        if "pair_index" in batch:
            batch["x_pair"] = self.device_tables(split, batch["index"].device)["x"][batch["pair_index"]]
        return super().gather(batch, split)
