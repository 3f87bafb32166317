"""What ``cli.py predict`` writes for the visual latent (spec 004; issue 12): ``DIR/latents.npy`` (``[N, C, H, W]``,
in the order of ``data.predict_file``) and, once the model has a decoder (P4 on), ``DIR/reconstructions.csv``
with each input sentence, the sentence the decoder writes from its latent alone, and the teacher-forced
share of its content tokens right. Under DDP every rank writes its own rows (``latents.rank{r}.npy``, ...),
and the ``index`` column or ``latent_index.rank{r}.npy`` says which sentences they are."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from text.tokenizer import decode


class LatentPredictionWriter(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    @staticmethod
    def _path(trainer: L.Trainer, name: str) -> Path:
        path = Path(trainer.default_root_dir) / name
        if trainer.world_size > 1:
            path = path.with_suffix(f".rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        index = torch.cat([batch["index"] for batch in batches]).cpu()
        np.save(self._path(trainer, "latents.npy"), torch.cat([b["latent"] for b in batches]).float().cpu().numpy())
        if trainer.world_size > 1:
            np.save(self._path(trainer, "latent_index.npy"), index.numpy())
        if "reconstruction" not in batches[0]:
            return
        data = trainer.datamodule
        sentences = data.predict_sentences
        outputs = [sentence for batch in batches for sentence in decode(data.tokenizer, batch["reconstruction"].cpu())]
        columns = ("content_accuracy", "content_exact_accuracy")
        shares = zip(*(torch.cat([batch[name] for batch in batches]).cpu().tolist() for name in columns))
        with self._path(trainer, "reconstructions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "input", "output", *columns])
            writer.writerows((i, sentences[i], output, *(f"{share:.4f}" for share in row))
                             for i, output, row in zip(index.tolist(), outputs, shares))
