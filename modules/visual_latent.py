"""Text to a 2-D "visual" latent, trained on text alone (spec 004, phases P1 to P5).

A pre-LN Transformer reads a sentence; a grid cross-attention head paints ``V [B, C, H, W]``
(``modules.networks``), optionally with the spec's slot-attention variant's Gaussian blobs over it
(``latent_head``); the readout, and P4's decoder, may see each map standardized, so that only the
layout can carry the sentence (``standardize_maps``: the configs' default). P1 shapes ``V`` with the
analytic image-ness priors only (``contrastive_weight: 0``, ``configs/p1_priors.yaml``); P2 adds InfoNCE between readouts
``z = g(V)`` of two meaning-preserving views, with the in-batch items and the constructed
counterfactuals as negatives (``configs/p2_contrastive.yaml``): ``L = L_img + alpha * InfoNCE``. P3
(``configs/p3_invariance.yaml``, from P2's weights) adds ``beta * ||g(T(V(x1))) - g(V(x2))||^2`` with the
latent jitter ``T`` of ``modules.latent_jitter`` (shifts, mild blur, cutout). P4
(``configs/p4_decoder.yaml``) trains a decoder ``D_psi`` (``modules.networks.text_decoder``) to write
each sentence back from its ``V`` and ``z`` by teacher forcing under a vocabulary mask, on a frozen
encoder and readout (``frozen``); its diagnostics are ``modules.latent_decoding``'s, and its
content tokens are scored against what the sentence's meaning allows (``text.blocks.continuations``). P5
(``configs/p5_round_trip.yaml``) trains every network with the whole stack, adding ``delta * L_cycle`` and
``rho * L_copySuppress`` over the best of ``k`` sentences sampled from the latent (``round_trip_terms``); from P4
on, every evaluation checks what the decoder writes from each held-out latent with the rule-based checker
(``modules.round_trip``: Graph F1, ROUGE-L, round-trip cosine), greedy and, once P5's terms train, best of ``k``.

Every prior is a per-sentence statistic, so a latent that ignores the text satisfies them all; the
public attempt at this plan collapsed exactly so. ``text_variance_weight`` (on by default; 0 is the
spec's literal P1) keeps the latent's variance across sentences above ``min_text_variance``, and
validation measures the share of variance that depends on the text (``val/text_dependence``).

Validation reports on held-out scenes: the latent's statistics (spectral slope per channel, TV,
gradient kurtosis, channel correlation), paraphrase retrieval R@1/R@5 and the cosine gap
``cos(z, z_paraphrase) - cos(z, z_counterfactual)``, how much of the across-sentence variance lies in
the layout rather than in each map's channel means (``val/spatial_text_dependence``, with the share of a
map the channel's template explains, ``val/template_share``), and the P3 robustness curve
``val/shift_cos_{s}px``, ``cos(g(V), g(shift(V, s)))``; the phase gates (``callbacks.phase_gate``)
read these names. ``val/r1_below_start`` is how far R@1 fell from the starting weights' (P3's "retrieval
doesn't drop more than 2%"), measured by the full sanity validation a run from ``init_from`` begins with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modules.distributed import global_info_nce
from modules.latent_decoding import decoder_logits, decoding_rows, frame_for_decoder, grid_attention
from modules.latent_decoding import summarize as summarize_decoding
from modules.latent_jitter import jitter, shift_robustness
from modules.latent_snapshot import LatentSnapshot
from modules.losses.bag_of_words import bag_of_words_loss, ngram_bag
from modules.losses.contrastive import invariance_loss, vicreg_regularizer
from modules.losses.decoding import reconstruction_loss, vocabulary_mask
from modules.losses.image_priors import (
    PRIOR_NAMES,
    gaussian_blur,
    image_prior_terms,
    latent_statistics,
    text_variance_loss,
)
from modules.losses.round_trip import copied_ngram_ends, copy_unlikelihood, round_trip_cosine_loss
from modules.method_base import MethodModule
from modules.metrics import paraphrase_retrieval
from modules.networks.grid_head import GridCrossAttentionHead, TextToGrid
from modules.networks.readout import READOUTS, AttentionReadout, MeanVarReadout
from modules.networks.slot_splat import SlotSplatHead, SummedHeads, TokenSplatHead, rename_pre_painter_weights
from modules.networks.text_decoder import LatentTextDecoder
from modules.networks.text_encoder import EMBEDDING_INIT_STD, TOKEN_EMBEDDING_STD, TextTransformer
from modules.optim import decay_groups
from modules.round_trip import (
    check_round_trips,
    chosen,
    greedy_round_trips,
    round_trip_candidates,
    sampled_round_trips,
    summarize_round_trips,
    written_length,
)
from text.blocks import COUNTERFACTUAL_KINDS, Scene
from text.blocks.sentences import FUNCTION_TOKEN, NO_SINGLE_KIND, content_words, content_words_by_kind
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID, join_padded, word_set_majorities

SPEC_PRIOR_WEIGHTS = {"spectrum": 0.5, "tv": 0.1, "wavelet": 0.1, "grad_kurtosis": 0.05, "cov": 0.05,
                      "var": 0.05}
MONTAGE_SIZE = 16
FREEZABLE = ("encoder", "readout")
LATENT_HEADS = ("grid", "slots", "grid_and_slots", "token_blobs", "grid_and_token_blobs")
ATTENTION_SENTENCES = 4  # montage sentences whose content tokens' attention maps are drawn
ROUND_TRIP_EXAMPLES = 20  # held-out sentences and their paraphrases in the W&B table


class VisualLatentText(MethodModule):
    """Encoder ``E: text -> V``, readout ``g: V -> z``, priors and contrast.

    Args:
        vocab_size, max_length: linked from the datamodule.
        dim, depth, heads, ffn_dim, dropout, positions: the Transformer (spec: 384, 6, 8, 1536, 0.1).
        token_embedding_std: the standard deviation its token embeddings start from (1; 0.02, the earlier
            default, leaves the token states alike at the start: ``modules.networks.text_encoder``);
            position_embedding_std: the same for learned positions (0.02).
        grid_size, channels, query_channels, head_depth, head_ffn_dim, smoothing, coordinate_channels:
            the grid cross-attention head (spec: 32, 6, 64, 2, 768; smoothing head optional).
        latent_head: ``grid`` (the spec's grid cross-attention head), ``slots`` (its slot-attention variant,
            ``modules.networks.slot_splat``: num_slots slots after slot_iterations rounds, each splatted as a
            Gaussian whose scales lie in slot_scales pixels; its MLP is head_ffn_dim wide) or
            ``grid_and_slots`` (their sum: the blobs over the grid head's texture); ``token_blobs`` paints every
            token as its own Gaussian, with scales in slot_scales pixels (``TokenSplatHead``, not in the spec),
            and ``grid_and_token_blobs`` sums those blobs and the grid head's texture.
        head_dim, head_dropout: the head's width and dropout when they differ from the encoder's
            (``None``: the same; a narrower head reads linearly projected token states).
        embedding_dim, readout_hidden_dim, pool_levels: ``g(V)``, mean/var pooling over the whole
            map (level 1, the spec's form) and over n x n cells for each further level, then an MLP.
        readout_kind: ``mean_variance`` (the spec's pooling, above) or ``attention`` (not in the spec: beside
            the pooled statistics, readout_queries learned queries of width readout_query_dim attend over the
            pixels, ``modules.networks.readout.AttentionReadout``; ``pool_levels: []`` leaves the queries alone).
        standardize_maps: the readout, and P4's decoder, see each map standardized, so that they read only the
            layout (``modules.networks.readout``); False is the spec's form, read raw.
        prior_weights: lambda per prior (spec: 0.5, 0.1, 0.1, 0.05, 0.05, 0.05).
        target_alpha, target_variance, kurtosis_target, wavelet: targets of the priors.
        text_variance_weight, min_text_variance: the anti-collapse term (0 = the spec's form).
        blur_sigma, blur_epochs: Gaussian blur of V before the priors in the first epochs.
        contrastive_weight: alpha of InfoNCE (0 in P1); temperature: tau (spec 0.07).
        invariance_weight: beta of P3's jitter invariance (0 before P3; spec 0.2); invariance_unit: compare
            the directions of ``z`` (default) or raw ``z`` (the spec's literal form, see
            ``modules.losses.contrastive.invariance_loss``); jitter_prob, max_shift, jitter_blur_sigma,
            cutout_size: the jitter ``T`` (spec 0.5, 2 px; mild blur, small cutout).
        decoder_depth: blocks of P4's decoder (0: none, P1 to P3); decoder_dim, decoder_heads,
            decoder_ffn_dim, decoder_dropout, pixel_mlp: its width and memory, decoder_token_embedding_std and
            decoder_memory_position_std the scales its token embeddings and its memory's row and column embeddings
            start from (0.02 and 0.02; unit scale localizes its attention sooner and reads less content in
            the CPU profile's steps: ``modules.networks.text_decoder``); decoder_patch_size: the decoder reads
            ``V`` in square patches of this side, each one memory token (1: every pixel, the spec's flattened
            ``V``; ``modules.networks.text_decoder.LatentMemory``);
            decoder_weight: gamma of ``L_dec``; decoder_hides_content: the decoder's prefix shows no content
            token (each is fed as BOS: ``modules.networks.text_decoder.hide_tokens``), so that no content
            word it writes can be copied from an earlier mention (not in the spec); vocab_mask: restrict its
            outputs to the tokens of the training corpus.
        round_trip_weight, copy_suppression_weight: delta of P5's ``L_cycle`` and rho of its ``L_copySuppress``
            (``round_trip_terms``; spec 0.2 and 0.1, 0 before P5); best_of_k, top_p: the candidates drawn per
            sentence by nucleus sampling inside the vocabulary mask (spec 4 and 0.9), in training and, once those
            terms train, in evaluation; copy_ngram: the n of the copied n-grams copy suppression penalizes.
        frozen: networks that do not train (P4: ``[encoder, readout]``); they also stay in eval mode.
        counterfactual_negatives: add each scene's counterfactual to the negatives.
        vicreg_weight: optional VICReg variance + covariance terms on ``z``.
        bag_of_words_weight: weight of the bag-of-words term on ``z`` (``modules.losses.bag_of_words``; 0 is
            the spec's objective): a linear head on ``z`` must give every word of each view, and with
            bag_of_words_ngrams > 1 its n-grams, hashed into bag_of_words_buckets buckets.
        alpha_range: channels whose spectral slope lies here count as image-like.
        lr, betas, weight_decay, warmup_steps, min_lr_factor, compile: see ``modules.method_base``; decoder_lr:
            the decoder's own peak learning rate (P5: 1e-4 beside the encoder's 2e-4; ``None``: ``lr``).
        init_from, init_prefixes: a checkpoint (e.g. the end of P1) whose weights, and tokenizer, start
            this run (``modules.method_base.MethodModule.load_initial_weights``).
    """

    NETWORKS = ("encoder", "readout")

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
        grid_size: int = 32,
        channels: int = 6,
        latent_head: Literal["grid", "slots", "grid_and_slots", "token_blobs", "grid_and_token_blobs"] = "grid",
        num_slots: int = 6,
        slot_iterations: int = 3,
        slot_scales: tuple[float, float] = (1.0, 8.0),
        query_channels: int = 64,
        head_dim: int | None = None,
        head_depth: int = 2,
        head_ffn_dim: int = 768,
        head_dropout: float | None = None,
        smoothing: bool = False,
        coordinate_channels: bool = False,
        embedding_dim: int = 256,
        readout_hidden_dim: int = 512,
        pool_levels: tuple[int, ...] = (1,),
        readout_kind: Literal["mean_variance", "attention"] = "mean_variance",
        readout_queries: int = 8,
        readout_query_dim: int = 64,
        standardize_maps: bool = False,
        prior_weights: dict[str, float] | None = None,
        target_alpha: float = 2.0,
        target_variance: float = 1.0,
        kurtosis_target: float = 4.0,
        wavelet: str = "db2",
        text_variance_weight: float = 0.05,
        min_text_variance: float = 0.5,
        blur_sigma: float = 0.8,
        blur_epochs: int = 2,
        contrastive_weight: float = 1.0,
        temperature: float = 0.07,
        counterfactual_negatives: bool = True,
        vicreg_weight: float = 0.0,
        bag_of_words_weight: float = 0.0,
        bag_of_words_ngrams: int = 1,
        bag_of_words_buckets: int = 4096,
        invariance_weight: float = 0.0,
        invariance_unit: bool = True,
        jitter_prob: float = 0.5,
        max_shift: int = 2,
        jitter_blur_sigma: float = 0.5,
        cutout_size: int = 4,
        decoder_depth: int = 0,
        decoder_dim: int = 384,
        decoder_heads: int = 8,
        decoder_ffn_dim: int = 1536,
        decoder_dropout: float = 0.1,
        decoder_token_embedding_std: float = EMBEDDING_INIT_STD,
        decoder_memory_position_std: float = EMBEDDING_INIT_STD,
        pixel_mlp: bool = False,
        decoder_patch_size: int = 1,
        decoder_weight: float = 1.0,
        decoder_hides_content: bool = False,
        vocab_mask: bool = True,
        round_trip_weight: float = 0.0,
        copy_suppression_weight: float = 0.0,
        best_of_k: int = 4,
        top_p: float = 0.9,
        copy_ngram: int = 4,
        frozen: tuple[str, ...] = (),
        lr: float = 2e-4,
        decoder_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        warmup_steps: int = 1000,
        min_lr_factor: float = 0.0,
        alpha_range: tuple[float, float] = (1.5, 2.5),
        compile: bool = False,
        init_from: str | None = None,
        init_prefixes: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if invariance_weight and not contrastive_weight:
            raise ValueError("invariance_weight needs contrastive_weight > 0: P3 builds on P2's readout z")
        if (round_trip_weight or copy_suppression_weight) and not decoder_depth:
            raise ValueError("round_trip_weight and copy_suppression_weight need a decoder (decoder_depth > 0)")
        if bag_of_words_weight and "readout" in frozen:
            raise ValueError("bag_of_words_weight shapes z, which a frozen readout (P4) keeps fixed: set it to 0")
        self.prior_weights = _checked_prior_weights(prior_weights)
        if latent_head not in LATENT_HEADS:
            raise ValueError(f"latent_head must be one of {LATENT_HEADS}, got {latent_head!r}")
        if readout_kind not in READOUTS:
            raise ValueError(f"readout_kind must be one of {READOUTS}, got {readout_kind!r}")
        # built before the heads, so that a seed initializes the networks as it did before the slot variant
        tokens = TextTransformer(vocab_size, max_length, dim, depth, heads, ffn_dim, dropout, positions, PAD_ID,
                                 token_embedding_std, position_embedding_std)
        heads_of_v = []
        if "grid" in latent_head:
            heads_of_v.append(GridCrossAttentionHead(
                head_dim or dim, grid_size, query_channels, channels, heads, head_ffn_dim, head_depth,
                dropout if head_dropout is None else head_dropout, smoothing, coordinate_channels))
        if "slots" in latent_head:
            heads_of_v.append(SlotSplatHead(head_dim or dim, grid_size, channels, num_slots, slot_iterations,
                                            head_ffn_dim, *slot_scales))
        if "token_blobs" in latent_head:
            heads_of_v.append(TokenSplatHead(head_dim or dim, grid_size, channels, *slot_scales))
        head = heads_of_v[0] if len(heads_of_v) == 1 else SummedHeads(*heads_of_v)
        self.encoder = TextToGrid(tokens, head)
        self.readout = (MeanVarReadout(channels, embedding_dim, readout_hidden_dim, tuple(pool_levels), standardize_maps)
                        if readout_kind == "mean_variance" else
                        AttentionReadout(channels, grid_size, embedding_dim, readout_hidden_dim, tuple(pool_levels),
                                         standardize_maps, readout_queries, readout_query_dim))
        # P1 has no loss on z: a trainable readout would be a parameter DDP waits for in vain.
        self.readout.requires_grad_(bool(contrastive_weight or bag_of_words_weight))
        self.bag_of_words = nn.Linear(embedding_dim, bag_of_words_buckets) if bag_of_words_weight else None
        self.decoder = None
        if decoder_depth:
            self.decoder = LatentTextDecoder(vocab_size, max_length + 2, channels, grid_size, embedding_dim,
                                             decoder_dim, decoder_depth, decoder_heads, decoder_ffn_dim,
                                             decoder_dropout, pixel_mlp, PAD_ID, standardize_maps,
                                             decoder_token_embedding_std, decoder_memory_position_std,
                                             decoder_patch_size)
            # What the decoder may write and which of its tokens are content, from the training corpus.
            self.register_buffer("allowed_tokens", torch.ones(vocab_size, dtype=torch.bool))
            self.register_buffer("content_kinds", torch.full((vocab_size,), FUNCTION_TOKEN))
            self.register_buffer("token_tables_built", torch.tensor(False))
        for name in frozen:
            if name not in FREEZABLE:
                raise ValueError(f"frozen names networks of {FREEZABLE}, got {name!r}")
            getattr(self, name).requires_grad_(False).eval()
        self.latent_snapshot: LatentSnapshot | None = None
        # R@1 of the starting weights (from init_from), for P3's "retrieval doesn't drop" criterion; kept in
        # the checkpoint beside the weights (not a buffer, so checkpoints from before it still load).
        self.start_r1 = float("nan")
        self.load_initial_weights()

    # ---- the model -------------------------------------------------------------------------
    def latent(self, ids: torch.Tensor) -> torch.Tensor:
        """``V [B, C, H, W]`` for token ids ``[B, L]`` (padding = ``PAD_ID``)."""
        return self.encoder(ids, ids != PAD_ID)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.readout(self.latent(ids))

    def train(self, mode: bool = True) -> VisualLatentText:
        super().train(mode)
        for name in self.hparams.frozen:
            getattr(self, name).eval()
        return self

    def on_fit_start(self) -> None:
        if self.decoder is not None and not bool(self.token_tables_built):
            allowed, kinds = decoder_token_tables(self.trainer.datamodule, self.hparams.vocab_size)
            self.allowed_tokens.copy_(allowed)
            self.content_kinds.copy_(kinds)
            self.token_tables_built.fill_(True)

    def _latents_of(self, *id_batches: torch.Tensor) -> list[torch.Tensor]:
        """One encoder pass over several batches of ids of different lengths."""
        ids, sizes = join_padded(*id_batches)
        return list(self.latent(ids).split(sizes))

    # ---- losses ----------------------------------------------------------------------------
    def prior_loss(self, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_img = sum_i lambda_i L_i`` (spec P1, "Losses"), plus the anti-collapse term."""
        hp = self.hparams
        if self.current_epoch < hp.blur_epochs and hp.blur_sigma > 0:
            v = gaussian_blur(v, hp.blur_sigma)
        terms = image_prior_terms(v, hp.target_alpha, hp.target_variance, hp.kurtosis_target, hp.wavelet)
        loss = sum(self.prior_weights[name] * terms[name] for name in PRIOR_NAMES)
        if hp.text_variance_weight:
            terms["text_variance"] = text_variance_loss(v, hp.min_text_variance)
            loss = loss + hp.text_variance_weight * terms["text_variance"]
        return loss, terms

    def contrastive_loss(self, z_a: torch.Tensor, z_b: torch.Tensor,
                         z_negative: torch.Tensor | None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch: each view's positive is the other view of its
        scene; every other scene's views (all ranks) and the counterfactuals are negatives."""
        return global_info_nce(self, z_a, z_b, z_negative, self.hparams.temperature)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        with torch.set_grad_enabled("encoder" not in hp.frozen):
            if not hp.contrastive_weight:
                latents = self._latents_of(batch["view_a"])
            elif hp.counterfactual_negatives:
                latents = self._latents_of(batch["view_a"], batch["view_b"], batch["counterfactual"].flatten(0, 1))
            else:
                latents = self._latents_of(batch["view_a"], batch["view_b"])
        loss, logs = torch.zeros((), device=latents[0].device), {}
        if "encoder" not in hp.frozen:  # the priors shape the encoder's latent, nothing else
            loss, terms = self.prior_loss(torch.cat(latents))
            logs = {f"train/prior_{name}": value for name, value in terms.items()}
        z = [self.readout(v) for v in latents] if hp.contrastive_weight or hp.bag_of_words_weight else []
        if hp.bag_of_words_weight:
            # each view's own words: the views of a scene differ in wording, and the head may spread over synonyms
            bags = [ngram_bag(ids, PAD_ID, hp.bag_of_words_ngrams, hp.bag_of_words_buckets)
                    for ids in (batch["view_a"], batch["view_b"])[:len(z)]]
            bow = bag_of_words_loss(self.bag_of_words(torch.cat(z[:2])), torch.cat(bags))
            loss = loss + hp.bag_of_words_weight * bow
            logs["train/bag_of_words"] = bow
        if hp.contrastive_weight:
            nce = self.contrastive_loss(z[0], z[1], z[2] if len(z) == 3 else None)
            loss = loss + hp.contrastive_weight * nce
            logs["train/info_nce"] = nce
            if hp.invariance_weight:
                z_jittered = self.readout(jitter(latents[0], hp.jitter_prob, hp.max_shift, hp.jitter_blur_sigma,
                                                 hp.cutout_size))
                invariance = invariance_loss(z_jittered, z[1], unit=hp.invariance_unit)
                loss = loss + hp.invariance_weight * invariance
                logs["train/invariance"] = invariance
            if hp.vicreg_weight:
                vicreg = vicreg_regularizer(torch.cat(z[:2]))
                loss = loss + hp.vicreg_weight * (vicreg["variance"] + vicreg["covariance"])
                logs |= {f"train/vicreg_{name}": value for name, value in vicreg.items()}
        if self.decoder is not None:
            logits, targets = decoder_logits(self.decoder, frame_for_decoder(batch["view_a"]), latents[0],
                                             self.readout(latents[0]), self._allowed(), self._hidden())
            logs["train/decoder_ce"] = reconstruction_loss(logits, targets)
            loss = loss + hp.decoder_weight * logs["train/decoder_ce"]
        if hp.round_trip_weight or hp.copy_suppression_weight:
            terms = self.round_trip_terms(batch["view_a"], latents[0], self.readout(latents[0]))
            loss = loss + hp.round_trip_weight * terms["cycle"] + hp.copy_suppression_weight * terms["copy_suppression"]
            logs |= {f"train/{name}": value for name, value in terms.items()}
        self.log_dict(logs, on_step=True, on_epoch=False, sync_dist=False)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def round_trip_terms(self, ids: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Spec P5's ``L_cycle`` and ``L_copySuppress`` on the sentences ``ids [B, L]`` with latents ``v``, ``z``.

        ``best_of_k`` candidates are drawn per sentence (nucleus sampling inside the vocabulary mask, no gradient)
        and the one whose re-encoding is closest to ``z`` is chosen (none, for a sentence whose every candidate
        wrote no word: an empty sentence has no meaning to compare). ``L_cycle`` trains through the chosen
        candidate two ways: ``1 - cos(g(V(x)), g(V(x_hat)))`` reaches the encoder and readout through both
        encodings (``round_trip_latent``), and the decoder's cross-entropy of the candidate given ``V(x)``,
        its words that complete a copied n-gram left out, reaches the decoder and, through ``V(x)``, the encoder
        (``round_trip_likelihood``): the decoder learns to write what re-encodes closest. ``L_copySuppress`` is
        unlikelihood on those copied words (``modules.losses.round_trip``)."""
        hp = self.hparams
        drawn = round_trip_candidates(self.decoder, self.embed, v, z, hp.best_of_k, hp.top_p, self._allowed(),
                                      self._hidden(), length=written_length(ids.shape[1]))
        kept = ~chosen(drawn["empty"], drawn["best"])  # a sentence whose candidates all wrote no word: none
        latent = round_trip_cosine_loss(z, self.embed(chosen(drawn["ids"], drawn["best"])), kept)
        logits, targets = decoder_logits(self.decoder, chosen(drawn["candidates"], drawn["best"]), v, z,
                                         self._allowed(), self._hidden())
        copied = copied_ngram_ends(targets, ids, hp.copy_ngram)
        likelihood = reconstruction_loss(logits, targets.masked_fill(copied | ~kept.unsqueeze(1), PAD_ID))
        return {"cycle": latent + likelihood, "round_trip_latent": latent, "round_trip_likelihood": likelihood,
                "copy_suppression": copy_unlikelihood(logits, targets, copied),
                "copied_share": copied.float().sum() / (targets != PAD_ID).sum().clamp(min=1)}

    def parameter_groups(self) -> list[dict]:
        """The base's groups; with ``decoder_lr`` the decoder's parameters form groups of their own at that peak."""
        groups = super().parameter_groups()
        if self.hparams.decoder_lr is None or self.decoder is None:
            return groups
        decoder_params = {id(param) for param in self.decoder.parameters()}
        rest = [group | {"params": [param for param in group["params"] if id(param) not in decoder_params]}
                for group in groups]
        decoder = [group | {"lr": self.hparams.decoder_lr}
                   for group in decay_groups(self.decoder, self.hparams.weight_decay)]
        return [group for group in rest + decoder if group["params"]]

    # ---- evaluation on held-out scenes -------------------------------------------------------
    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        sentence, paraphrases, counterfactuals = batch["sentence"], batch["paraphrases"], batch["counterfactuals"]
        b, p, k = len(sentence), paraphrases.shape[1], counterfactuals.shape[1]
        v_sentence, v_paraphrase, v_counterfactual = self._latents_of(
            sentence, paraphrases.flatten(0, 1), counterfactuals.flatten(0, 1)
        )
        outputs = {
            "v": v_sentence,
            "z": self.readout(v_sentence),
            "z_paraphrase": self.readout(v_paraphrase).view(b, p, -1),
            "z_counterfactual": self.readout(v_counterfactual).view(b, k, -1),
            "counterfactual_kind": batch["counterfactual_kind"],
        }
        if self.decoder is not None:
            outputs["ids"] = F.pad(sentence, (0, self.hparams.max_length - sentence.shape[1]), value=PAD_ID)
            outputs |= {f"decoding_{name}": values for name, values in decoding_rows(
                self.decoder, self.readout, sentence, v_sentence, outputs["z"], self._allowed(),
                self.content_kinds, batch["accepted"], batch["best_continuation"], self._hidden()).items()}
            outputs["index"] = batch["index"]
            outputs |= self._round_trip_rows(sentence.shape[1], v_sentence, outputs["z"])
        return outputs

    def _round_trip_rows(self, width: int, v: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the decoder writes from held-out latents: greedy, and once P5's terms train, also the best of
        ``best_of_k`` samples (the procedure they train; P4's decoder is trained for its argmax alone)."""
        hp, length = self.hparams, written_length(width)
        rows = greedy_round_trips(self.decoder, self.embed, v, z, self._allowed(), self._hidden(), length)
        if hp.round_trip_weight or hp.copy_suppression_weight:
            rows |= sampled_round_trips(self.decoder, self.embed, v, z, hp.best_of_k, hp.top_p, self._allowed(),
                                        self._hidden(), length)
        for name in ("greedy", "sampled"):  # one width for every batch, so that the split's rows concatenate
            if name in rows:
                rows[name] = F.pad(rows[name], (0, self.decoder.max_length - rows[name].shape[1]), value=PAD_ID)
        return {f"round_trip_{name}": values for name, values in rows.items()}

    def evaluate(self, split: str, outputs: dict[str, torch.Tensor]) -> None:
        v = outputs["v"].float()
        stats = latent_statistics(v)
        low, high = self.hparams.alpha_range
        alpha = stats["alpha"]
        metrics = {
            "channels_alpha_in_range": ((alpha >= low) & (alpha <= high)).sum().float(),
            "tv": stats["tv"],
            "grad_kurtosis_min": stats["kurtosis"].min(),
            "max_offdiag_correlation": stats["max_offdiag_correlation"],
            "text_dependence": stats["text_dependence"],
            "spatial_text_dependence": stats["spatial_text_dependence"],
            "template_share": stats["template_share"],
        }
        metrics |= {f"alpha_c{c}": value for c, value in enumerate(alpha)}
        metrics |= paraphrase_retrieval(outputs["z"], outputs["z_paraphrase"], outputs["z_counterfactual"],
                                        outputs["counterfactual_kind"], COUNTERFACTUAL_KINDS)
        metrics |= {f"shift_cos_{s}px": value for s, value in shift_robustness(self.readout, v).items()}
        if self.decoder is not None:
            rows = {name.removeprefix("decoding_"): values for name, values in outputs.items()
                    if name.startswith("decoding_")}
            metrics |= summarize_decoding(rows)
        round_trips = None
        if self.decoder is not None and self._trainer is not None:
            round_trip_metrics, round_trips = self._check_round_trips(split, outputs)
            metrics |= round_trip_metrics
        if self._record_start_r1(split, float(metrics["r1"])):
            metrics["r1_below_start"] = self.start_r1 - metrics["r1"]
        # Identical on every rank (computed from gathered outputs), so no reduction is needed.
        self.log_dict({f"{split}/{name}": torch.as_tensor(value, dtype=torch.float32)
                       for name, value in metrics.items()}, sync_dist=False)
        attention = self._content_attention(outputs) if self.decoder is not None and self._trainer is not None else {}
        self.latent_snapshot = _snapshot(v, stats, outputs, self.current_epoch, self.global_step, **attention,
                                         round_trips=round_trips)

    def _check_round_trips(self, split: str, outputs: dict) -> tuple[dict, list[dict]]:
        """Spec P5's checker on the held-out sentences, for greedy decoding (names ending in ``_greedy``) and, when
        ``_round_trip_rows`` drew them, the best of ``best_of_k`` samples; and the first ``ROUND_TRIP_EXAMPLES``
        of the last of the two as table rows."""
        data = self.trainer.datamodule
        items = [data.eval_pack[split][index] for index in outputs["index"].tolist()]
        sources, scenes = [item["sentence"] for item in items], [Scene.from_json(item["graph"]) for item in items]
        metrics = {}
        for kind, suffix in (("greedy", "_greedy"), ("sampled", "")):
            if f"round_trip_{kind}" in outputs:
                checks = check_round_trips(data.tokenizer, outputs[f"round_trip_{kind}"], sources, scenes)
                cosines = outputs[f"round_trip_{kind}_cosine"]
                metrics |= summarize_round_trips(checks, cosines, outputs[f"round_trip_{kind}_cosine_other"], scenes,
                                                 suffix)
        rows = zip(sources, checks["text"], checks["graph_f1"], checks["rouge_l"], cosines)
        examples = [{"input": source, "output": text, "graph_f1": float(f1), "rouge_l": float(rouge),
                     "cosine": float(cosine)} for source, text, f1, rouge, cosine in rows]
        return metrics, examples[:ROUND_TRIP_EXAMPLES]

    @torch.no_grad()
    def _content_attention(self, outputs: dict, sentences: int = ATTENTION_SENTENCES) -> dict:
        """``attention``: the decoder's grid attention ``[T, H, W]`` (last block, heads averaged) at each content
        token of the first montage sentences; ``attention_labels``: ``sentence: token`` per map."""
        # Outside the step, so outside autocast: the latents in the weights' precision.
        ids, v, z = outputs["ids"][:sentences], outputs["v"][:sentences].float(), outputs["z"][:sentences].float()
        framed = frame_for_decoder(ids)
        weights = grid_attention(self.decoder, framed, v, z, self._hidden())
        targets = framed[:, 1:]
        content = self.content_tokens[targets] & (targets != PAD_ID)
        tokenizer = self.trainer.datamodule.tokenizer
        rows = content.nonzero(as_tuple=True)[0]
        labels = [f"{row}: {tokenizer.id_to_token(token).lstrip('Ġ')}"
                  for row, token in zip(rows.tolist(), targets[content].tolist())]
        return {"attention": weights[content].view(-1, *v.shape[2:]).cpu(), "attention_labels": labels}

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Each sentence's latent ``V``; with a decoder also its greedy reconstruction from the latent alone
        and the teacher-forced share of its content tokens the decoder gets right
        (``callbacks.latent_prediction_writer`` writes them)."""
        ids = batch["sentence"]
        v = self.latent(ids)
        outputs = {"index": batch["index"], "latent": v}
        if self.decoder is not None:
            z = self.readout(v)
            outputs["reconstruction"] = self.decoder.generate(v, z, BOS_ID, EOS_ID, self._allowed(),
                                                              self._hidden())
            rows = decoding_rows(self.decoder, self.readout, ids, v, z, self._allowed(), self.content_kinds,
                                 batch["accepted"], batch["best_continuation"], self._hidden())
            content = rows["content_tokens"].clamp(min=1)
            outputs["content_exact_accuracy"] = rows["content_exact_hits"] / content
            # the meaning's continuations are known only for sentences of the grammar
            outputs["content_accuracy"] = torch.where(batch["parsed"], rows["content_hits"] / content, float("nan"))
        return outputs

    def _allowed(self) -> torch.Tensor | None:
        return self.allowed_tokens if self.hparams.vocab_mask else None

    def _hidden(self) -> torch.Tensor | None:
        return self.content_tokens if self.hparams.decoder_hides_content else None

    def _record_start_r1(self, split: str, r1: float) -> bool:
        """Whether the starting R@1 is known, taking it at the sanity validation of a run from ``init_from``
        when that covers the whole validation split (``num_sanity_val_steps: -1``, as P3's config sets; P3's
        gate needs it, so there a partial one is an error)."""
        if (self._trainer is not None and self.trainer.sanity_checking and split == "val"
                and self.hparams.init_from is not None and math.isnan(self.start_r1)):
            seen, batches = self.trainer.num_sanity_val_batches[0], self.trainer.num_val_batches[0]
            if seen == batches:
                self.start_r1 = r1
            elif self.hparams.invariance_weight:
                raise ValueError(f"the starting R@1 needs the whole validation split ({batches} batches) in the "
                                 f"sanity validation, which saw {seen}: set trainer.num_sanity_val_steps: -1")
        return not math.isnan(self.start_r1)

    @property
    def content_tokens(self) -> torch.Tensor:
        """Bool ``[vocab]``: the decoder's content tokens (colors, shapes, counts, relation words)."""
        return self.content_kinds != FUNCTION_TOKEN

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["start_r1"] = self.start_r1

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.start_r1 = checkpoint.get("start_r1", float("nan"))

    def upgrade_state_dict(self, state: dict) -> None:
        """The slot head's weights from before ``GaussianPainter``, and the decoder's content tokens from before
        they had kinds: content of no known kind until the next fit rebuilds the tables from its corpus."""
        for name, module in self.named_modules():
            if isinstance(module, SlotSplatHead):
                rename_pre_painter_weights(state, f"{name}.")
        if "content_tokens" in state:
            state["content_kinds"] = torch.where(state.pop("content_tokens"), NO_SINGLE_KIND, FUNCTION_TOKEN)
            state["token_tables_built"] = torch.tensor(False)


def decoder_token_tables(data, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, kinds)`` ``[vocab_size]`` from the datamodule's training corpus: the tokens its sentences
    use (and EOS), and per token the index of its kind in ``CONTENT_KINDS`` (``content_kind_table``)."""
    views = data.host_tables("train")["views"]
    allowed = vocabulary_mask(torch.cat([views.flatten(), torch.tensor([EOS_ID])]), vocab_size)
    sentences = [sentence for item in data.train_examples for sentence in item["views"]]
    kinds = content_kind_table(data.tokenizer, sentences)
    return allowed, F.pad(kinds, (0, vocab_size - len(kinds)), value=FUNCTION_TOKEN)


def content_kind_table(tokenizer, sentences: list[str]) -> torch.Tensor:
    """Per token id, ``Long [vocab]``: the index in ``CONTENT_KINDS`` of the kind of content it states,
    ``FUNCTION_TOKEN`` for a function token, ``NO_SINGLE_KIND`` for a content token whose word states more than
    one ("block" is a shape and a verb of "in front of"): a word alone cannot tell which, so such tokens count
    towards content accuracy but towards no kind's."""
    by_kind = content_words_by_kind()
    own_words = [words.difference(*(other for name, other in by_kind.items() if name != kind))
                 for kind, words in by_kind.items()]
    majority = word_set_majorities(tokenizer, sentences, [content_words(), *own_words])
    kinds = torch.where(majority[:, 0], NO_SINGLE_KIND, FUNCTION_TOKEN)
    for index in range(len(own_words)):  # own words are disjoint, so a token wins at most one kind
        kinds[majority[:, 0] & majority[:, 1 + index]] = index
    return kinds


def _checked_prior_weights(weights: dict[str, float] | None) -> dict[str, float]:
    weights = dict(SPEC_PRIOR_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(PRIOR_NAMES)
    if unknown:
        raise ValueError(f"prior_weights has unknown priors {sorted(unknown)}; known: {list(PRIOR_NAMES)}")
    return {name: float(weights.get(name, 0.0)) for name in PRIOR_NAMES}


def _snapshot(v: torch.Tensor, stats: dict, outputs: dict, epoch: int, step: int,
              attention: torch.Tensor | None = None, attention_labels: list[str] | None = None,
              round_trips: list[dict] | None = None) -> LatentSnapshot:
    """What the plots need, on the CPU: the montage sentences' latents and a paraphrase-group map."""
    z, z_paraphrase, z_counterfactual = outputs["z"], outputs["z_paraphrase"], outputs["z_counterfactual"]
    groups = torch.arange(len(z), device=z.device)
    num_paraphrases, num_counterfactuals = z_paraphrase.shape[1], z_counterfactual.shape[1]
    all_z = torch.cat([z, z_paraphrase.flatten(0, 1), z_counterfactual.flatten(0, 1)])
    all_groups = torch.cat([groups, groups.repeat_interleave(num_paraphrases),
                            groups.repeat_interleave(num_counterfactuals)])
    is_counterfactual = torch.zeros(len(all_z), dtype=torch.bool)
    is_counterfactual[len(z) * (1 + num_paraphrases):] = True
    return LatentSnapshot(
        montage=v[:MONTAGE_SIZE].detach().cpu(),
        radii=stats["radii"].cpu(),
        power=stats["power"].cpu(),
        alpha=stats["alpha"].cpu(),
        correlation=stats["correlation"].cpu(),
        tv=float(stats["tv"]),
        kurtosis=stats["kurtosis"].cpu(),
        z=all_z.detach().float().cpu(),
        z_group=all_groups.cpu(),
        z_is_counterfactual=is_counterfactual,
        epoch=epoch,
        global_step=step,
        attention=attention,
        attention_labels=attention_labels,
        round_trips=round_trips,
    )
