"""LightningDataModules and the data utilities they share."""

from datamodules.embeddings import EmbeddingsDataModule

__all__ = ["EmbeddingsDataModule"]
