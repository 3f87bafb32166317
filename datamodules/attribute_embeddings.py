"""Frozen embeddings with binary attributes: the data of attribute transfer (spec 001, issue 11).

Sources, in order of precedence:

* ``celeba_dir``: CelebA's ``list_attr_celeba.txt`` (-1/1 per attribute) and ``list_eval_partition.txt``
  (0/1/2: train/val/test), beside an ``embeddings`` file whose rows follow the images in name order, as
  ``python -m tools.image_embeddings`` writes a flat image folder (sorted by name); when that tool's
  ``files.txt`` lies next to the embeddings, rows are matched to images by its file names instead, so a
  subset of the images may be embedded. ``celeba_attributes`` picks the columns (the spec's five).
* ``embeddings`` + ``attributes``: ``.npy``/``.npz``/``.pt`` arrays ``[N, D]`` and ``[N, A]`` (0/1 or
  -1/1), optional ``attribute_names``, and an optional ``partition`` file ``[N]`` of 0/1/2 (train/val/test,
  CelebA's codes) or 3 (probe); without one, items are split at random by the seeded fractions.
* nothing: a world with ground truth (``world``), five binary attributes whose true counterfactual is known
  for every val/test item (``z_star``): ``sentences`` (default), block-world sentences under a fixed schema
  (``text.blocks.attributes``) embedded by the frozen MiniLM; ``shapes``, rendered two-group shape scenes
  through a small frozen CNN (``datamodules.shape_scenes``), where the attributes are entangled.

The splits are ``train``, ``val``, ``probe`` (real embeddings the evaluation's frozen probes are fitted
on) and ``test``. Where a source has no probe split of its own, it is cut from the train split
(``probe_fraction`` of it, seeded). Embeddings are L2-normalized on load.

Training batches carry a ``target`` per item, drawn once per epoch by the index loader (1 or 2 attributes
flipped, spec FIX 2; so resume and DDP see the same draws). Val and test have a fixed ``target`` drawn
once from the data seed by the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from lightning.pytorch.trainer.states import RunningStage

from clustering.attributes import check_binary, flip_attributes
from datamodules.arrays import archive_keys, as_embeddings, load_array
from datamodules.index_batches import IndexBatchLoader, ItemDraw
from datamodules.index_tables import TRAIN_VAL_TEST_SPLITS, IndexTablesDataModule, Tables
from datamodules.shape_scenes import ATTRIBUTE_NAMES as SHAPE_ATTRIBUTES
from datamodules.shape_scenes import ShapeScene, default_embedder, sample_scenes
from text.blocks.attributes import (
    DEFAULT_SCHEMA,
    AttributeItem,
    attribute_vector,
    sample_items,
    with_attributes,
)
from text.sentence_embeddings import embed_sentences

SPLITS = ("train", "val", "probe", "test")
TARGET_SPLITS = ("val", "test")
PARTITION_CODES = {0: "train", 1: "val", 2: "test", 3: "probe"}
CELEBA_ATTRIBUTES = ("Smiling", "Young", "Male", "Eyeglasses", "Mustache")  # the spec's five
CELEBA_ATTRIBUTE_FILE = "list_attr_celeba.txt"
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
IMAGE_LIST_FILE = "files.txt"  # written by tools.image_embeddings beside its embeddings


@dataclass
class AttributeData:
    """All items of a source: unit embeddings, 0/1 attributes and the rows of each split."""

    z: torch.Tensor
    attributes: torch.Tensor
    names: list[str]
    rows: dict[str, torch.Tensor]
    items: dict[str, list] = field(default_factory=dict)  # a world's items (sentences, scenes) per split


@dataclass(frozen=True)
class SentenceWorld:
    """Block-world sentences under ``DEFAULT_SCHEMA``, embedded by the frozen MiniLM (cached)."""

    model_path: str | None = None
    cache_dir: str | None = None
    names: tuple[str, ...] = tuple(DEFAULT_SCHEMA.names)

    def sample(self, sizes: dict[str, int], seed: int) -> dict[str, list[AttributeItem]]:
        return sample_items(DEFAULT_SCHEMA, sizes, seed)

    def attributes(self, item: AttributeItem) -> list[int]:
        return attribute_vector(DEFAULT_SCHEMA, item.facts)

    def counterfactual(self, item: AttributeItem, target: Sequence[int]) -> AttributeItem:
        return with_attributes(DEFAULT_SCHEMA, item, target)

    def embed(self, items: Sequence[AttributeItem]) -> torch.Tensor:
        return embed_sentences([item.sentence for item in items], model_path=self.model_path,
                               cache_dir=self.cache_dir)


@dataclass(frozen=True)
class ShapeWorld:
    """Rendered shape scenes through the frozen CNN (``datamodules.shape_scenes``)."""

    names: tuple[str, ...] = tuple(SHAPE_ATTRIBUTES)

    def sample(self, sizes: dict[str, int], seed: int) -> dict[str, list[ShapeScene]]:
        return sample_scenes(sizes, seed)

    def attributes(self, item: ShapeScene) -> list[int]:
        return item.attributes

    def counterfactual(self, item: ShapeScene, target: Sequence[int]) -> ShapeScene:
        return item.with_attributes(target)

    def embed(self, items: Sequence[ShapeScene]) -> torch.Tensor:
        return default_embedder()(items)


WORLDS = ("sentences", "shapes")


def unit_rows(z: torch.Tensor, source: str) -> torch.Tensor:
    """``z`` with unit rows; a zero row has no direction and is refused."""
    norms = z.norm(dim=1)
    zero = (norms == 0).nonzero().flatten()
    if len(zero):
        raise ValueError(f"{source}: {len(zero)} embedding rows are all zero "
                         f"(first rows: {zero[:5].tolist()}), "
                         "which cannot be normalized")
    return z / norms.unsqueeze(1)


def cut_probe(rows: torch.Tensor, fraction: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` cut at random into (train, probe), ``fraction`` of them (rounded) for the probe."""
    order = rows[torch.randperm(len(rows), generator=generator)]
    num_probe = round(fraction * len(rows))
    return order[num_probe:].sort().values, order[:num_probe].sort().values


def random_split(num_items: int, fractions: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random rows per split: each held-out split its fraction of the items, train the rest."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    rows, start = {}, 0
    for split, fraction in fractions.items():
        count = round(fraction * num_items)
        rows[split] = order[start:start + count].sort().values
        start += count
    return {"train": order[start:].sort().values} | rows


def partition_rows(partition: torch.Tensor, num_items: int, probe_fraction: float, seed: int,
                   source: str) -> dict[str, torch.Tensor]:
    """Rows per split from codes 0/1/2/3 (train/val/test/probe); without any 3 the probe split is cut
    from train."""
    partition = partition.flatten() if partition.dim() == 2 and partition.shape[1] == 1 else partition
    if partition.dim() != 1 or len(partition) != num_items:
        raise ValueError(f"{source}: partition of shape {tuple(partition.shape)} does not match the "
                         f"{num_items} embeddings (need [{num_items}])")
    unknown = ~torch.isin(partition, torch.tensor(list(PARTITION_CODES), dtype=partition.dtype))
    if bool(unknown.any()):
        row = int(unknown.nonzero()[0])
        raise ValueError(f"{source}: partition codes must be {PARTITION_CODES}; "
                         f"row {row} is {partition[row].item()}")
    rows = {split: (partition == code).nonzero().flatten() for code, split in PARTITION_CODES.items()}
    if len(rows["probe"]) == 0:
        rows["train"], rows["probe"] = cut_probe(rows["train"], probe_fraction,
                                                 torch.Generator().manual_seed(seed))
    return rows


def read_attribute_arrays(
    embeddings: str, attributes: str | None, attribute_names: Sequence[str] | None, embeddings_key: str,
    attributes_key: str,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Unit embeddings ``[N, D]``, 0/1 attributes ``[N, A]`` and their names from array files; the attributes
    may be an entry ``attributes_key`` of the embeddings' own ``.npz``/``.pt``."""
    if attributes is None:
        if attributes_key not in archive_keys(embeddings):
            raise ValueError(f"{embeddings}: holds no {attributes_key!r} entry; give attributes= (a file)")
        attributes = embeddings
    z = unit_rows(as_embeddings(load_array(embeddings, embeddings_key), embeddings), embeddings)
    values = load_array(attributes, attributes_key)
    if values.dim() != 2 or len(values) != len(z):
        raise ValueError(f"{attributes}: attributes of shape {tuple(values.shape)} do not match "
                         f"embeddings of shape {tuple(z.shape)} in {embeddings} (need [{len(z)}, A])")
    values = check_binary(values, str(attributes))
    num_attributes = values.shape[1]
    names = [f"attr_{i}" for i in range(num_attributes)] if attribute_names is None else list(attribute_names)
    if len(names) != num_attributes:
        raise ValueError(f"{attributes}: {num_attributes} attribute columns but "
                         f"{len(names)} attribute_names {names}")
    return z, values, names


def _celeba_lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the CelebA layout needs {CELEBA_ATTRIBUTE_FILE} "
                                f"and {CELEBA_PARTITION_FILE})")
    return [line.split() for line in path.read_text().splitlines()]


def read_celeba_attributes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """Image names, the attribute names and the -1/1 values ``[N, 40]`` of ``list_attr_celeba.txt``."""
    lines = _celeba_lines(path)
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        first = " ".join(lines[0]) if lines else ""
        raise ValueError(f"{path}: line 1 must be the number of images, got {first!r}")
    names, images, values = lines[1], [], []
    for number, parts in enumerate(lines[2:], start=3):
        if not parts:
            continue
        if len(parts) != len(names) + 1 or any(value not in ("-1", "1") for value in parts[1:]):
            raise ValueError(f"{path}: line {number} must be an image name and {len(names)} values "
                             "of -1 or 1, "
                             f"got {' '.join(parts)!r}")
        images.append(parts[0])
        values.append([int(value) for value in parts[1:]])
    if len(images) != int(lines[0][0]):
        raise ValueError(f"{path}: line 1 announces {lines[0][0]} images but the file lists {len(images)}")
    return images, names, torch.tensor(values, dtype=torch.float32)


def read_celeba_partition(path: Path) -> dict[str, int]:
    """Image name -> official split code (0 train, 1 val, 2 test) of ``list_eval_partition.txt``."""
    codes = {}
    for number, parts in enumerate(_celeba_lines(path), start=1):
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}: line {number} must be an image name and 0, 1 or 2, "
                             f"got {' '.join(parts)!r}")
        codes[parts[0]] = int(parts[1])
    return codes


def embedding_image_names(embeddings: str, all_images: list[str], num_rows: int) -> list[str]:
    """The image of each embedding row: by ``files.txt`` beside the embeddings when present, else all
    images in the attribute file's (name) order."""
    listing = Path(embeddings).with_name(IMAGE_LIST_FILE)
    if listing.is_file():
        images = [Path(line).name for line in listing.read_text().splitlines() if line.strip()]
        source = f"{listing} lists"
    else:
        images, source = all_images, f"the attribute file lists (no {IMAGE_LIST_FILE} beside them)"
    if len(images) != num_rows:
        raise ValueError(f"{embeddings}: {num_rows} embedding rows but {source} {len(images)} images")
    return images


def read_celeba(celeba_dir: str, embeddings: str, embeddings_key: str, columns: Sequence[str],
                probe_fraction: float, seed: int) -> AttributeData:
    """CelebA attributes and official splits for the embedded images (the train split cut into train
    and probe)."""
    folder = Path(celeba_dir)
    attribute_file, partition_file = folder / CELEBA_ATTRIBUTE_FILE, folder / CELEBA_PARTITION_FILE
    all_images, names, values = read_celeba_attributes(attribute_file)
    unknown = [name for name in columns if name not in names]
    if unknown:
        raise ValueError(f"{attribute_file}: no attributes {unknown}; the known ones are {names}")
    codes = read_celeba_partition(partition_file)
    z = unit_rows(as_embeddings(load_array(embeddings, embeddings_key), embeddings), embeddings)
    images = embedding_image_names(embeddings, all_images, len(z))
    index = {image: row for row, image in enumerate(all_images)}
    for image in images:
        if image not in index or image not in codes:
            missing = attribute_file if image not in index else partition_file
            raise ValueError(f"{missing}: has no line for image {image!r} of the embeddings {embeddings}")
    rows = torch.tensor([index[image] for image in images], dtype=torch.long)
    selected = values[rows][:, [names.index(name) for name in columns]]
    partition = torch.tensor([codes[image] for image in images])
    split_rows = partition_rows(partition, len(z), probe_fraction, seed, str(partition_file))
    return AttributeData(z, check_binary(selected, str(attribute_file)), list(columns), split_rows)


class AttributeEmbeddingsDataModule(IndexTablesDataModule):
    """Unit embeddings ``z [N, D]`` with binary ``attributes [N, A]``, per split (spec 001, issue 11).

    Args:
        embeddings, attributes: array files (see the module docstring); ``embeddings_key``,
            ``attributes_key`` pick entries of ``.npz``/dict ``.pt`` files.
        attribute_names: names of the attribute columns; default ``attr_0, attr_1, ...``.
        partition: optional array file of split codes per row (0 train, 1 val, 2 test, 3 probe).
        val_fraction, probe_fraction, test_fraction: the random split without a partition; the
            probe fraction also cuts the probe split from a partition's (or CelebA's) train split.
        celeba_dir: a folder in the CelebA layout, read with ``embeddings``; ``celeba_attributes``
            picks its columns.
        world: the default source's world, ``sentences`` or ``shapes`` (see the module docstring).
        num_train, num_val, num_probe, num_test: the world's items per split (default source).
        batch_size, eval_batch_size: per device.
        seed: seeds the splits, the world's items, the fixed val/test targets, the epoch orders and
            the training targets; ``None``: the global seed of ``seed_everything``.
        sentence_model: local sentence-transformers folder; ``None``: the packaged all-MiniLM-L6-v2.
        text_cache_dir: where the sentence world's embeddings are cached.
    """

    STAGE_SPLITS: ClassVar[dict[RunningStage | None, str]] = TRAIN_VAL_TEST_SPLITS

    def __init__(
        self,
        embeddings: str | None = None,
        attributes: str | None = None,
        attribute_names: list[str] | None = None,
        partition: str | None = None,
        embeddings_key: str = "embeddings",
        attributes_key: str = "attributes",
        val_fraction: float = 0.1,
        probe_fraction: float = 0.2,
        test_fraction: float = 0.2,
        celeba_dir: str | None = None,
        celeba_attributes: Sequence[str] = CELEBA_ATTRIBUTES,
        world: str = "sentences",
        num_train: int = 4000,
        num_val: int = 500,
        num_probe: int = 1000,
        num_test: int = 500,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        seed: int | None = None,
        sentence_model: str | None = None,
        text_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.resolve_data_seed()
        fractions = {"val_fraction": val_fraction, "probe_fraction": probe_fraction,
                     "test_fraction": test_fraction}
        for name, fraction in fractions.items():
            if not 0 < fraction < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {fraction}")
        if val_fraction + probe_fraction + test_fraction >= 1:
            raise ValueError(f"val, probe and test fractions {fractions} leave no training items")
        if (celeba_dir is not None or attributes is not None or partition is not None) and embeddings is None:
            raise ValueError("celeba_dir=, attributes= and partition= need embeddings= "
                             "(the array file they describe)")
        if celeba_dir is not None and (attributes is not None or partition is not None):
            raise ValueError("celeba_dir= brings its own attributes and partition; "
                             "drop attributes=/partition=")
        if world not in WORLDS:
            raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
        sizes = {"num_train": num_train, "num_val": num_val, "num_probe": num_probe, "num_test": num_test}
        if min(sizes.values()) < 1:
            raise ValueError(f"the world's split sizes must be positive, got {sizes}")

    def __str__(self) -> str:
        sizes = ", ".join(f"{split}={len(self._data.rows[split])}" for split in SPLITS)
        return (f"{type(self).__name__}(source={self.source_name!r}, items {sizes}, "
                f"attributes={self.attribute_names}, dim={self.embedding_dim})")

    # ---- what the model is linked to -------------------------------------------------------
    @property
    def attribute_names(self) -> list[str]:
        return list(self._data.names)

    @property
    def num_attributes(self) -> int:
        return len(self._data.names)

    @property
    def embedding_dim(self) -> int:
        return self._data.z.shape[1]

    @property
    def has_counterfactuals(self) -> bool:
        """Whether val/test know the true counterfactual embedding ``z_star`` (the worlds do)."""
        return bool(self._data.items)

    @property
    def num_train_items(self) -> int:
        return len(self._data.rows["train"])

    @property
    def source_name(self) -> str:
        hp = self.hparams
        if hp.celeba_dir is not None:
            return f"CelebA {hp.celeba_dir} with {hp.embeddings}"
        if hp.embeddings is not None:
            return hp.embeddings
        return {"sentences": "block-world attribute sentences", "shapes": "rendered shape scenes"}[hp.world]

    # ---- sources ---------------------------------------------------------------------------
    @cached_property
    def _data(self) -> AttributeData:
        hp = self.hparams
        if hp.celeba_dir is not None:
            return read_celeba(hp.celeba_dir, hp.embeddings, hp.embeddings_key, hp.celeba_attributes,
                               hp.probe_fraction, hp.seed)
        if hp.embeddings is not None:
            z, attributes, names = read_attribute_arrays(hp.embeddings, hp.attributes, hp.attribute_names,
                                                         hp.embeddings_key, hp.attributes_key)
            if hp.partition is not None:
                rows = partition_rows(load_array(hp.partition), len(z), hp.probe_fraction, hp.seed,
                                      hp.partition)
            else:
                rows = random_split(len(z), {"val": hp.val_fraction, "probe": hp.probe_fraction,
                                             "test": hp.test_fraction}, hp.seed)
            return AttributeData(z, attributes, names, rows)
        return self._world_data()

    @cached_property
    def world(self) -> SentenceWorld | ShapeWorld:
        hp = self.hparams
        if hp.world == "shapes":
            return ShapeWorld()
        return SentenceWorld(hp.sentence_model, hp.text_cache_dir)

    def _world_data(self) -> AttributeData:
        """The default source: the world's items per split, each embedded once."""
        hp = self.hparams
        sizes = {"train": hp.num_train, "val": hp.num_val, "probe": hp.num_probe, "test": hp.num_test}
        items = self.world.sample(sizes, hp.seed)
        ordered = [item for split in SPLITS for item in items[split]]
        attributes = torch.tensor([self.world.attributes(item) for item in ordered], dtype=torch.float32)
        counts = torch.tensor([len(items[split]) for split in SPLITS])
        starts = counts.cumsum(0) - counts
        rows = {split: torch.arange(start, start + count)
                for split, start, count in zip(SPLITS, starts.tolist(), counts.tolist())}
        return AttributeData(self.world.embed(ordered), attributes, list(self.world.names), rows, items)

    # ---- fixed evaluation targets and their true counterfactuals ----------------------------
    @cached_property
    def _targets(self) -> dict[str, torch.Tensor]:
        """Per val/test item its attributes with 1 or 2 flipped, drawn once from the data seed."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return {split: flip_attributes(self._split_attributes(split), generator) for split in TARGET_SPLITS}

    def _split_attributes(self, split: str) -> torch.Tensor:
        return self._data.attributes[self._data.rows[split]]

    def counterfactual_items(self, split: str) -> list:
        """A world's val/test items, each with the same identity (and wording) and its target attributes."""
        items = self.items(split)
        if split not in TARGET_SPLITS:
            raise ValueError(f"only {TARGET_SPLITS} have fixed targets, not {split!r}")
        return [self.world.counterfactual(item, target.long().tolist())
                for item, target in zip(items, self._targets[split])]

    def items(self, split: str) -> list:
        """A world's items (sentences or scenes) of ``split``, in the order of its tables."""
        if not self.has_counterfactuals:
            raise ValueError(f"{self.source_name} has no items of a world; only the default source does")
        if split not in SPLITS:
            raise ValueError(f"no split {split!r}; the splits are {SPLITS}")
        return self._data.items[split]

    @cached_property
    def _counterfactual_embeddings(self) -> dict[str, torch.Tensor]:
        items = {split: self.counterfactual_items(split) for split in TARGET_SPLITS}
        z = self.world.embed([item for split in TARGET_SPLITS for item in items[split]])
        return dict(zip(TARGET_SPLITS, z.split([len(items[split]) for split in TARGET_SPLITS])))

    # ---- tables and batches ----------------------------------------------------------------
    def host_tables(self, split: str) -> Tables:
        """``z`` and ``attributes`` of ``split``; val and test also the fixed ``target`` and, when the
        source knows it, ``z_star``, the embedding of the same item with the target attributes."""
        if split not in SPLITS:
            raise ValueError(f"no split {split!r}; the splits are {SPLITS}")
        rows = self._data.rows[split]
        tables = {"z": self._data.z[rows], "attributes": self._data.attributes[rows]}
        if split in TARGET_SPLITS:
            tables["target"] = self._targets[split]
            if self.has_counterfactuals:
                tables["z_star"] = self._counterfactual_embeddings[split]
        return tables

    def split_tables(self, split: str) -> Tables:
        """The host tables of ``split``, for evaluation code (the probes fit on ``probe``'s)."""
        return self.host_tables(split)

    def neighbour_pool(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The real embeddings and attributes the neighbour checks of an evaluation on ``split`` search:
        train, probe and ``split`` itself. The evaluated items' own sources are in it, so a point left at
        its source finds it (and fails), and the pool is large enough that the true counterfactuals mostly
        land on distinct neighbours (on the sentences, 0.92 against 0.64 in the test split alone)."""
        splits = dict.fromkeys(("train", "probe", split))
        rows = torch.cat([self._data.rows[name] for name in splits])
        return self._data.z[rows], self._data.attributes[rows]

    def training_draw(self) -> ItemDraw:
        """Per item and epoch a ``target``: its attributes with 1 or 2 flipped (spec FIX 2)."""
        attributes = self._split_attributes("train")

        def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
            if num_items != len(attributes):
                raise ValueError(f"drawing for {num_items} items, but the train split has {len(attributes)}")
            return {"target": flip_attributes(attributes, generator)}

        return draw

    def gather(self, batch: dict, split: str) -> dict:
        """``z`` and ``attributes`` of the batch's items (and the split's fixed ``target``, ``z_star``);
        a training batch brings its drawn ``target``."""
        if "z" in batch:  # already materialized (e.g. a batch built by hand)
            return batch
        tables = self.device_tables(split, batch["index"].device)
        return {name: values[batch["index"]] for name, values in tables.items()} | batch

    # ---- setup and loaders -----------------------------------------------------------------
    def setup(self, stage: str) -> None:
        for split in SPLITS:
            if len(self._data.rows[split]) == 0:
                raise ValueError(f"the {split} split of {self.source_name} holds no items")

    def train_dataloader(self) -> IndexBatchLoader:
        return self.train_loader(self.num_train_items, self.training_draw())

    def val_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._data.rows["val"]))

    def test_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._data.rows["test"]))

    predict_dataloader = test_dataloader
