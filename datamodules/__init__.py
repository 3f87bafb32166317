"""LightningDataModules and the data utilities they share (imported by dotted path, so importing
one datamodule does not import the others)."""
