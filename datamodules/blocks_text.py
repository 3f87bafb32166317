"""Sentences about colored blocks, as token ids for the visual-latent encoder (spec 004, section 0).

Training items are scenes of the train split, each with ``views_per_scene`` meaning-preserving
realizations and ``counterfactuals_per_scene`` meaning-breaking ones (``text.blocks``).
Every epoch draws, per scene, two distinct views and one counterfactual from a generator seeded by
``(seed, epoch)``, so resumed and multi-GPU runs see the same pairs.

Validation and test read the evaluation pack shipped with the code (held-out scenes of the val and
test splits): each item's sentence, its paraphrases and its counterfactuals. ``predict`` reads the
sentences of ``predict_file`` (one per line), a ``sentence [b, L]`` per batch. Evaluation and predict
batches also carry, per decoder target, the tokens the sentence's meaning allows there and the one most of
its realizations write (``accepted [b, L + 1, K]``, ``best_continuation [b, L + 1]``,
``text.blocks.continuations``), which score a decoder on meaning rather than on wording.

All ids are held as tensors, moved once to the module's device, and gathered there per batch
(``datamodules.index_tables``). Each batch is cut to its longest sentence: the width is read on the
host from a table of sentence lengths before the batch moves, so the device never reports back.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

from datamodules.index_batches import IndexBatchLoader, ItemDraw
from datamodules.index_tables import IndexTablesDataModule
from text.blocks import COUNTERFACTUAL_KINDS, load_eval_pack, training_examples
from text.blocks.continuations import continuation_tables
from text.blocks.scenes import check_edit_kinds
from text.tokenizer import PAD_ID, encode, train_bpe, trim_padding

EVAL_ID_KEYS = ("sentence", "paraphrases", "counterfactuals")
ID_TABLES = ("train_views", "train_counterfactuals", *(f"{split}_{key}" for split in ("val", "test") for key in EVAL_ID_KEYS))


def view_pair_draw(num_views: int, num_counterfactuals: int, per_anchor: int = 1) -> ItemDraw:
    """Per item: two distinct view slots ``view_a != view_b``, and ``per_anchor`` distinct
    counterfactuals worded like ``view_a`` (slots ``view_a + num_views * round``: counterfactual ``i``
    is a minimal pair with view ``i % num_views``), the hardest negatives for the anchor."""
    if num_views < 2:
        raise ValueError(f"views_per_scene={num_views}: contrastive pairs need at least 2 views")
    if num_counterfactuals < num_views or num_counterfactuals % num_views:
        raise ValueError(f"counterfactuals_per_scene={num_counterfactuals} must be a positive multiple of "
                         f"views_per_scene={num_views}, so that every view has its minimal-pair negatives")
    rounds = num_counterfactuals // num_views
    if not 1 <= per_anchor <= rounds:
        raise ValueError(f"counterfactuals_per_anchor={per_anchor} must lie in [1, {rounds}] "
                         f"(counterfactuals_per_scene / views_per_scene)")

    def draw(generator: torch.Generator, num_items: int) -> dict[str, torch.Tensor]:
        view_a = torch.randint(num_views, (num_items,), generator=generator)
        offset = torch.randint(1, num_views, (num_items,), generator=generator)
        chosen_rounds = torch.rand(num_items, rounds, generator=generator).argsort(dim=1)[:, :per_anchor]
        return {"view_a": view_a, "view_b": (view_a + offset) % num_views,
                "counterfactual": view_a[:, None] + num_views * chosen_rounds}

    return draw


def _longest(lengths: torch.Tensor) -> int:
    """The largest of host-side sentence lengths; 0 for an empty batch (a rank's empty evaluation shard)."""
    return int(lengths.max()) if lengths.numel() else 0


class BlocksTextDataModule(IndexTablesDataModule):
    """Token ids of generated block-world sentences, their views and counterfactuals.

    Args:
        num_train_scenes: distinct training scenes generated from ``seed``.
        views_per_scene, counterfactuals_per_scene: realizations generated per training scene;
            counterfactual ``i`` is a minimal pair with view ``i % views_per_scene``, and with
            ``len(counterfactual_kinds)`` x views_per_scene each view has one of each kind.
        counterfactual_kinds: the edits training negatives make, names of ``text.blocks.EDIT_KINDS``: by
            default the spec's four (color, relation, count, swapped arguments); ``shape`` adds a shape flip
            (README, "What the latent holds": measured, not adopted).
        counterfactuals_per_anchor: negatives worded like the anchor drawn per item and step.
        vocab_size: size of the byte-level BPE vocabulary (an upper bound: a small corpus may
            need fewer merges); linked to the model's embedding table.
        max_length: longest tokenized sentence allowed (spec: 64).
        tokenizer_file: a saved ``tokenizer.json`` to use instead of training one.
        batch_size: scenes per device and step; eval_batch_size: evaluation items per batch.
        eval_items: evaluate on the first ``eval_items`` items of the pack (``None``: all).
        seed: seeds the corpus and each epoch's view draws; ``None``: the global seed of ``seed_everything``.
        predict_file: a text file of sentences, one per line (blank lines skipped), for ``cli.py predict``.
    """

    def __init__(
        self,
        num_train_scenes: int = 20000,
        views_per_scene: int = 6,
        counterfactuals_per_scene: int = 24,
        counterfactual_kinds: tuple[str, ...] = COUNTERFACTUAL_KINDS,
        counterfactuals_per_anchor: int = 1,
        vocab_size: int = 4096,
        max_length: int = 64,
        tokenizer_file: str | None = None,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        eval_items: int | None = None,
        seed: int | None = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        check_edit_kinds(counterfactual_kinds, "data.counterfactual_kinds")
        self.save_hyperparameters(logger=False)
        self.resolve_data_seed()
        self._tokenizer: Tokenizer | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._lengths: dict[str, torch.Tensor] = {}

    def __str__(self) -> str:
        return f"{type(self).__name__}(scenes={self.hparams.num_train_scenes}, seed={self.hparams.seed})"

    # ---- linked to the model ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hparams.vocab_size

    @property
    def max_length(self) -> int:
        return self.hparams.max_length

    # ---- corpus and tokenizer --------------------------------------------------------------
    @cached_property
    def train_examples(self) -> list[dict]:
        hp = self.hparams
        return training_examples(hp.num_train_scenes, hp.seed, hp.views_per_scene, hp.counterfactuals_per_scene,
                                 tuple(hp.counterfactual_kinds))

    @cached_property
    def eval_pack(self) -> dict:
        return load_eval_pack()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._load_or_train_tokenizer()
        return self._tokenizer

    def _load_or_train_tokenizer(self) -> Tokenizer:
        if self.hparams.tokenizer_file is not None:
            path = Path(self.hparams.tokenizer_file)
            if not path.exists():
                raise FileNotFoundError(f"data.tokenizer_file {path} does not exist")
            tokenizer = Tokenizer.from_file(str(path))
        else:
            sentences = (s for item in self.train_examples for s in item["views"] + item["counterfactuals"])
            tokenizer = train_bpe(sentences, self.hparams.vocab_size)
        if tokenizer.get_vocab_size() > self.hparams.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.get_vocab_size()} ids but data.vocab_size is {self.hparams.vocab_size}"
            )
        return tokenizer

    def _encode(self, sentences: list[str]) -> torch.Tensor:
        return encode(self.tokenizer, sentences, self.hparams.max_length)

    def _encode_all(self) -> None:
        train = self.train_examples
        views = self._encode([s for item in train for s in item["views"]])
        counterfactuals = self._encode([s for item in train for s in item["counterfactuals"]])
        self._tensors = {
            "train_views": trim_padding(views.view(len(train), -1, views.shape[-1])),
            "train_counterfactuals": trim_padding(
                counterfactuals.view(len(train), -1, counterfactuals.shape[-1])
            ),
        }
        for split in ("val", "test"):
            items = self.eval_pack[split][: self.hparams.eval_items]
            self._tensors[f"{split}_sentence"] = self._encode([item["sentence"] for item in items])
            for key in ("paraphrases", "counterfactuals"):
                flat = self._encode([s for item in items for s in item[key]])
                self._tensors[f"{split}_{key}"] = flat.view(len(items), -1, flat.shape[-1])
            self._tensors[f"{split}_counterfactual_kind"] = torch.tensor(
                [[COUNTERFACTUAL_KINDS.index(kind) for kind in item["counterfactual_kinds"]] for item in items]
            )
            self._add_continuations(split, [item["sentence"] for item in items])
        if self.hparams.predict_file is not None:
            self._tensors["predict_sentence"] = self._encode_predict_file(Path(self.hparams.predict_file))
            self._add_continuations("predict", self.predict_sentences)
        self._lengths = {name: (self._tensors[name] != PAD_ID).sum(-1) for name in self._tensors
                         if name in ID_TABLES or name == "predict_sentence"}
        self.clear_device_tables()

    def _add_continuations(self, split: str, sentences: list[str]) -> None:
        tables = continuation_tables(self.tokenizer, sentences, self.hparams.max_length + 1)
        if split != "predict" and not bool(tables["parsed"].all()):
            raise ValueError(f"the evaluation pack's {split} sentence "
                             f"{sentences[int((~tables['parsed']).nonzero()[0])]!r} is outside the grammar")
        self._tensors[f"{split}_accepted"] = tables["accepted"]
        self._tensors[f"{split}_best_continuation"] = tables["best"]
        self._tensors[f"{split}_parsed"] = tables["parsed"]

    @property
    def predict_sentences(self) -> list[str]:
        """The sentences of ``predict_file``, in the order of the predictions."""
        if self.hparams.predict_file is None:
            raise ValueError("cli.py predict needs data.predict_file: a text file of sentences, one per line")
        path = Path(self.hparams.predict_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.predict_file {path} does not exist")
        sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not sentences:
            raise ValueError(f"data.predict_file {path} holds no sentence")
        return sentences

    def _encode_predict_file(self, path: Path) -> torch.Tensor:
        try:
            return self._encode(self.predict_sentences)
        except ValueError as error:
            raise ValueError(f"data.predict_file {path}: {error}") from error

    def setup(self, stage: str) -> None:
        if not self._tensors:
            self._encode_all()
        if self.trainer is not None and self.trainer.world_size > 1:
            # Every rank trains the same BPE from the same corpus; rank 0's is made the rule anyway.
            self._use_tokenizer(self.trainer.strategy.broadcast(self.tokenizer.to_str(), src=0))
        if stage == "fit" and self.trainer is not None and self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "tokenizer.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save(str(path))
            rank_zero_info(f"tokenizer ({self.tokenizer.get_vocab_size()} ids) saved to {path}")

    def state_dict(self) -> dict:
        return super().state_dict() | {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state_dict: dict) -> None:
        """A checkpoint's tokenizer wins over a freshly trained one (ids must mean what they meant);
        the training loader's place in the epoch is the base's."""
        super().load_state_dict(state_dict)
        self._use_tokenizer(state_dict["tokenizer"])

    def _use_tokenizer(self, saved: str) -> None:
        """Encode with the tokenizer serialized in ``saved`` (re-encoding only when it differs)."""
        if saved != self.tokenizer.to_str():
            self._tokenizer = Tokenizer.from_str(saved)
            self._encode_all()

    @property
    def montage_sentences(self) -> list[str]:
        """The 16 fixed sentences of the latent montage: the first 16 validation items."""
        return [item["sentence"] for item in self.eval_pack["val"][:16]]

    # ---- loaders ---------------------------------------------------------------------------
    STAGE_SPLITS: ClassVar[dict[RunningStage | None, str]] = {
        RunningStage.TRAINING: "train", RunningStage.SANITY_CHECKING: "val", RunningStage.VALIDATING: "val",
        RunningStage.TESTING: "test", RunningStage.PREDICTING: "predict", None: "val",
    }

    def _view_draw(self):
        return view_pair_draw(self._tensors["train_views"].shape[1], self._tensors["train_counterfactuals"].shape[1],
                              self.hparams.counterfactuals_per_anchor)

    def train_dataloader(self) -> IndexBatchLoader:
        return self.train_loader(self.num_train_items, self._view_draw(), self._train_widths)

    def training_items_dataloader(self) -> IndexBatchLoader:
        """Every training scene once, in order, with the view pairs and widths its gather needs."""
        return self.eval_loader(self.num_train_items, self._view_draw(), self._train_widths)

    @property
    def num_train_items(self) -> int:
        return len(self._tensors["train_views"])

    def val_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._tensors["val_sentence"]), host_fields=self._eval_widths("val"))

    def test_dataloader(self) -> IndexBatchLoader:
        return self.eval_loader(len(self._tensors["test_sentence"]), host_fields=self._eval_widths("test"))

    def predict_dataloader(self) -> IndexBatchLoader:
        count = len(self.predict_sentences)  # names the missing file or option before anything else

        def width(batch: dict) -> dict:
            return {"width": {"sentence": _longest(self._lengths["predict_sentence"][batch["index"]])}}

        return self.eval_loader(count, host_fields=width)

    def _train_widths(self, batch: dict) -> dict:
        """Token columns each training field needs: its longest drawn sentence, read on the host."""
        index, views, counterfactuals = batch["index"], self._lengths["train_views"], self._lengths["train_counterfactuals"]
        return {"width": {"view_a": _longest(views[index, batch["view_a"]]),
                          "view_b": _longest(views[index, batch["view_b"]]),
                          "counterfactual": _longest(counterfactuals[index[:, None], batch["counterfactual"]])}}

    def _eval_widths(self, split: str):
        def widths(batch: dict) -> dict:
            return {"width": {key: _longest(self._lengths[f"{split}_{key}"][batch["index"]]) for key in EVAL_ID_KEYS}}

        return widths

    def host_tables(self, split: str) -> dict[str, torch.Tensor]:
        return {name[len(split) + 1:]: ids for name, ids in self._tensors.items() if name.startswith(f"{split}_")}

    def gather(self, batch: dict, split: str) -> dict:
        """Gather token ids on the device, each field cut to the batch's ``width`` (computed on the
        host): ``view_a``, ``view_b`` ``[b, L]`` and ``counterfactual`` ``[b, n, L]`` in training;
        ``sentence [b, L]``, ``paraphrases [b, P, L]``, ``counterfactuals [b, K, L]`` and
        ``counterfactual_kind [b, K]`` (index into ``COUNTERFACTUAL_KINDS``) in evaluation; in evaluation
        and predict, ``accepted [b, L + 1, K']``, ``best_continuation [b, L + 1]`` and ``parsed [b]``."""
        index, width = batch["index"], batch.pop("width")
        tables = self.device_tables(split, index.device)
        if split == "train":
            views, counterfactuals = tables["views"], tables["counterfactuals"]
            batch["view_a"] = views[index, batch["view_a"], : width["view_a"]]
            batch["view_b"] = views[index, batch["view_b"], : width["view_b"]]
            batch["counterfactual"] = counterfactuals[index[:, None], batch["counterfactual"], : width["counterfactual"]]
            return batch
        targets = width["sentence"] + 1  # the decoder writes the sentence, then EOS
        batch["accepted"] = tables["accepted"][index, :targets]
        batch["best_continuation"] = tables["best_continuation"][index, :targets]
        batch["parsed"] = tables["parsed"][index]
        if split == "predict":
            batch["sentence"] = tables["sentence"][index, : width["sentence"]]
            return batch
        for key in EVAL_ID_KEYS:
            batch[key] = tables[key][index, ..., : width[key]]
        batch["counterfactual_kind"] = tables["counterfactual_kind"][index]
        return batch
