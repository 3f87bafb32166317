"""Spec 004 P5's round trip: sentences written from the latent alone, re-encoded, and checked.

``round_trip_candidates`` draws ``k`` candidates per sentence by nucleus sampling inside the vocabulary mask,
re-encodes them and picks the one whose ``g(V(x_hat))`` is closest in direction to the source's ``g(V(x))``
(``modules.losses.round_trip.best_of_k``). ``check_round_trips`` reads the written sentences on the host:
Graph F1 against the source's scene (``text.blocks.checker``), ROUGE-L against the source (torchmetrics),
whether the parser could read them and whether they are verbatim copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.text import rouge_score

from modules.losses.round_trip import best_of_k
from text.blocks.checker import check_graph
from text.blocks.scenes import COUNTS, RELATIONS, Scene
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID, decode

SAMPLING_SEED = 0
# How many tokens longer than its batch's longest sentence a written one may run: a paraphrase changes voice and
# number words, a few tokens; a longer one is cut, unread by the parser and far from its source.
LENGTH_SLACK = 10


def written_length(width: int) -> int:
    """The decoder ids ``BOS .. EOS`` written for sentences of at most ``width`` tokens (a host integer)."""
    return width + 2 + LENGTH_SLACK


def encoder_ids(generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder output ``BOS w_1 .. w_n EOS PAD ..`` ``[B, T]`` as encoder ids ``w_1 .. w_n PAD ..`` ``[B, T - 2]``
    and ``empty [B]``, the rows that wrote no word. The last position goes with the BOS: at the decoder's full
    length (the encoder's ``max_length + 2``) only EOS fits there, and a row that wrote a word there was cut off
    anyway. An empty row is given one EOS, so that the encoder has a token to read; its embedding means nothing,
    so the callers score it 0 or leave it out."""
    words = generated[:, 1:-1]
    ids = words.masked_fill((words == EOS_ID).cumsum(dim=1) > 0, PAD_ID)
    empty = (ids == PAD_ID).all(dim=1)
    ids[:, 0] = torch.where(empty, EOS_ID, ids[:, 0])
    return ids, empty


def round_trip_candidates(decoder, embed, v: torch.Tensor, z: torch.Tensor, k: int, top_p: float,
                          allowed: torch.Tensor | None, hidden: torch.Tensor | None = None,
                          length: int | None = None, generator: torch.Generator | None = None) -> dict:
    """``k`` nucleus samples per sentence from its latent ``v [B, C, H, W]``, ``z [B, E]``, and the best:

    ``candidates [B, k, T]`` (decoder ids), ``ids [B, k, T - 2]`` (encoder ids), ``z [B, k, E]`` (their
    embeddings), ``empty [B, k]``, ``cosines [B, k]`` to the source's ``z`` (-2 for an empty candidate, so it is
    chosen only when all are empty), ``best [B]``. No gradient: the choice is a selection, and the callers
    re-encode what they train through."""
    with torch.no_grad():
        candidates = decoder.generate(v, z, BOS_ID, EOS_ID, allowed, hidden, top_p=top_p, generator=generator,
                                      length=length, copies=k)
        ids, empty = encoder_ids(candidates)
        z_candidates = embed(ids).view(len(v), k, -1)
        _, cosines = best_of_k(z, z_candidates)
        empty = empty.view(len(v), k)
        cosines = cosines.masked_fill(empty, -2.0)
    return {"candidates": candidates.view(len(v), k, -1), "ids": ids.view(len(v), k, -1), "z": z_candidates,
            "empty": empty, "cosines": cosines, "best": cosines.argmax(dim=1)}


def chosen(rows: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``rows [B, k, ...]`` at each row's ``best [B]`` candidate."""
    return rows[torch.arange(len(rows), device=rows.device), best]


@torch.no_grad()
def greedy_round_trips(decoder, embed, v: torch.Tensor, z: torch.Tensor, allowed: torch.Tensor | None,
                       hidden: torch.Tensor | None, length: int) -> dict[str, torch.Tensor]:
    """Per held-out sentence: its greedy decoding ``greedy [B, length]`` and the cosines of the decoding's
    re-encoding to the source's ``z`` (``round_trip_cosines``)."""
    greedy = decoder.generate(v, z, BOS_ID, EOS_ID, allowed, hidden, length=length)
    ids, empty = encoder_ids(greedy)
    return {"greedy": greedy} | round_trip_cosines(z, embed(ids), empty, "greedy")


def round_trip_cosines(z: torch.Tensor, z_written: torch.Tensor, empty: torch.Tensor, name: str) -> dict:
    """``{name}_cosine [B]``: ``cos(g(V(x)), g(V(x_hat)))`` of each source and what was written from it, and
    ``{name}_cosine_other [B]``: the same against what was written from the batch's previous sentence, the floor
    that an unrelated sentence reaches (0 for an empty one)."""
    own = F.cosine_similarity(z, z_written, dim=-1).masked_fill(empty, 0.0)
    other = F.cosine_similarity(z, z_written.roll(1, dims=0), dim=-1).masked_fill(empty.roll(1, dims=0), 0.0)
    return {f"{name}_cosine": own, f"{name}_cosine_other": other}


@torch.no_grad()
def sampled_round_trips(decoder, embed, v: torch.Tensor, z: torch.Tensor, k: int, top_p: float,
                        allowed: torch.Tensor | None, hidden: torch.Tensor | None, length: int,
                        seed: int = SAMPLING_SEED) -> dict[str, torch.Tensor]:
    """Per held-out sentence: the best of ``k`` nucleus samples (``round_trip_candidates``, from a generator
    seeded with ``seed``, so an evaluation is repeatable), ``sampled [B, length]``, and its cosines
    (``round_trip_cosines``)."""
    generator = torch.Generator(v.device).manual_seed(seed)
    drawn = round_trip_candidates(decoder, embed, v, z, k, top_p, allowed, hidden, length, generator)
    best = {name: chosen(drawn[name], drawn["best"]) for name in ("candidates", "z", "empty")}
    return {"sampled": best["candidates"]} | round_trip_cosines(z, best["z"], best["empty"], "sampled")


def check_round_trips(tokenizer, generated: torch.Tensor, sources: list[str], scenes: list[Scene]) -> dict:
    """Host-side checks of the sentences ``generated [N, T]`` (decoder ids) against their ``sources`` and the
    sources' ``scenes``: per row ``text``, ``graph_f1``, ``parsed``, ``rouge_l`` (F-measure of the longest
    common subsequence of words) and ``verbatim`` (the same words as the source)."""
    texts = decode(tokenizer, generated.cpu())
    checks = [check_graph(scene, text) for scene, text in zip(scenes, texts)]
    return {
        "text": texts,
        "graph_f1": torch.tensor([check.f1 for check in checks]),
        "parsed": torch.tensor([check.parsed for check in checks]),
        "rouge_l": torch.tensor([float(rouge_score(text, source, rouge_keys="rougeL")["rougeL_fmeasure"])
                                 for text, source in zip(texts, sources)]),
        "verbatim": torch.tensor([_words(text) == _words(source) for text, source in zip(texts, sources)]),
    }


def _words(sentence: str) -> list[str]:
    return sentence.lower().replace(",", " ").replace(".", " ").split()


def summarize_round_trips(checks: dict, cosines: torch.Tensor, other_cosines: torch.Tensor, scenes: list[Scene],
                          suffix: str = "") -> dict:
    """The split's P5 checker metrics from ``check_round_trips`` rows and the round-trip ``cosines [N]`` (and
    ``other_cosines [N]``, against another sentence's: ``round_trip_cosines``): means of Graph F1, ROUGE-L and
    both cosines, the shares unread by the parser and verbatim, and Graph F1 over the sources with each relation
    (``none``: no relation) and with a group of each count; every name ends in ``suffix``."""
    metrics = {"graph_f1": checks["graph_f1"].mean(), "rouge_l": checks["rouge_l"].mean(),
               "round_trip_cosine": cosines.float().mean().cpu(),
               "round_trip_cosine_other": other_cosines.float().mean().cpu(),
               "unparsed_share": (~checks["parsed"]).float().mean(), "verbatim_share": checks["verbatim"].float().mean()}
    groups = {f"graph_f1_relation_{name}": [name in {r.name for r in scene.relations} for scene in scenes]
              for name in RELATIONS}
    groups["graph_f1_relation_none"] = [not scene.relations for scene in scenes]
    groups |= {f"graph_f1_count_{count}": [count in {g.count for g in scene.groups} for scene in scenes]
               for count in COUNTS}
    for name, members in groups.items():
        if any(members):
            metrics[name] = checks["graph_f1"][torch.tensor(members)].mean()
    return {f"{name}{suffix}": value for name, value in metrics.items()}
