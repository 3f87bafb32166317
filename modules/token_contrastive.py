"""A warm start for spec 004's P2 (not in the spec): its text Transformer alone, trained on P2's InfoNCE.

``z`` is a linear map of the mean of the token states, with no grid in the way, so a step costs a fraction of a
P2 step. That matters for who is related to whom. A swap of a relation's arguments ("a on b" -> "b on a")
keeps every word, and a paraphrase in the inverse voice ("b under a") keeps the meaning. So only a Transformer
that combines the groups' order with the relation's voice tells them apart. On the CPU profile this objective
teaches it that after about 500 steps with rotary positions (with learned ones the gap is 0.03 by step 1,250), and P2
through the grid, stopped by its gate at step 187, never did (README, "The decoder reads V in patches, and a
warm start"). P2 then
starts from these weights: ``--model.init_args.init_from DIR/checkpoints/last.ckpt --model.init_args.init_prefixes
'[encoder.encoder.]'`` (the Transformer lies under the same names as in ``modules.visual_latent``, and the
tokenizer travels with it). Validation logs P2's retrieval and cosine gaps per counterfactual kind
(``modules.metrics.paraphrase_retrieval``) on the same held-out pack.
"""

from __future__ import annotations

from typing import Literal

import torch

from modules.distributed import global_info_nce
from modules.method_base import MethodModule
from modules.metrics import paraphrase_retrieval
from modules.networks.text_encoder import (
    EMBEDDING_INIT_STD,
    TOKEN_EMBEDDING_STD,
    MeanTokenEmbedding,
    TextTransformer,
)
from text.blocks import COUNTERFACTUAL_KINDS
from text.tokenizer import PAD_ID, join_padded


class TokenContrastive(MethodModule):
    """Args: the Transformer's (``modules.networks.text_encoder.TextTransformer``; P2's names and defaults),
    embedding_dim (the width of ``z``), temperature (InfoNCE's tau, spec 0.07), counterfactual_negatives (each
    anchor's minimal-pair counterfactuals among its negatives, as in P2), and ``modules.method_base``'s optimizer
    names; vocab_size, max_length and batch_size come from ``datamodules.blocks_text.BlocksTextDataModule``."""

    NETWORKS = ("encoder",)

    def __init__(
        self,
        vocab_size: int,
        max_length: int = 64,
        dim: int = 384,
        depth: int = 6,
        heads: int = 8,
        ffn_dim: int = 1536,
        dropout: float = 0.1,
        positions: Literal["rope", "learned"] = "rope",
        token_embedding_std: float = TOKEN_EMBEDDING_STD,
        position_embedding_std: float = EMBEDDING_INIT_STD,
        embedding_dim: int = 256,
        temperature: float = 0.07,
        counterfactual_negatives: bool = True,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 1000,
        min_lr_factor: float = 0.0,
        compile: bool = False,
        init_from: str | None = None,
        init_prefixes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        tokens = TextTransformer(vocab_size, max_length, dim, depth, heads, ffn_dim, dropout, positions, PAD_ID,
                                 token_embedding_std, position_embedding_std)
        self.encoder = MeanTokenEmbedding(tokens, embedding_dim)
        self.load_initial_weights()

    def _embed(self, *id_batches: torch.Tensor) -> list[torch.Tensor]:
        """One pass over several batches of ids of different lengths."""
        ids, sizes = join_padded(*id_batches)
        return list(self.encoder(ids).split(sizes))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        negatives = (batch["counterfactual"].flatten(0, 1),) if self.hparams.counterfactual_negatives else ()
        z_a, z_b, *z_negative = self._embed(batch["view_a"], batch["view_b"], *negatives)
        loss = global_info_nce(self, z_a, z_b, z_negative[0] if z_negative else None, self.hparams.temperature)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        paraphrases, counterfactuals = batch["paraphrases"], batch["counterfactuals"]
        z, z_paraphrase, z_counterfactual = self._embed(batch["sentence"], paraphrases.flatten(0, 1),
                                                        counterfactuals.flatten(0, 1))
        return {"z": z, "z_paraphrase": z_paraphrase.view(*paraphrases.shape[:2], -1),
                "z_counterfactual": z_counterfactual.view(*counterfactuals.shape[:2], -1),
                "counterfactual_kind": batch["counterfactual_kind"]}

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        metrics = paraphrase_retrieval(outputs["z"], outputs["z_paraphrase"], outputs["z_counterfactual"],
                                       outputs["counterfactual_kind"], COUNTERFACTUAL_KINDS)
        self.log_dict({f"{split}/{name}": value for name, value in metrics.items()})
