"""Who is related to whom, read off each color word's token state: does a spec 004 encoder's Transformer
compute the roles at all, or are they lost on the way to the grid?

    python benchmarks/token_roles.py --checkpoints main_p2=runs/p2_contrastive_cpu/checkpoints/last.ckpt \
        --out FILE.json

The sentences probed name two groups of different colors and one relation between them ("a pair of blue
tubes are held up by two green balls": ``on(blue tubes, green balls)``). Every occurrence of either color
word is an example, labeled 1 when its group is the relation's subject (the canonical relation, so the inverse
voice, "green balls hold up blue tubes", names the same subject). A probe reads the label from the token's
state after each block ``k`` of the Transformer (``layer_k``; the last one before the final LayerNorm) and
before the first (``layer_0``: the token embeddings, plus learned positions where the encoder has them). It is
trained on the checkpoint's own training views and scored on the held-out validation sentences and their
paraphrases. Order alone cannot earn the score: in the active voice the subject comes first, in the inverse
voice second, so the score is the accuracy averaged over the two (``balanced``: 0.5 for a reader of order or of
the color alone, 1 for a reader of the roles). ``subject_first`` and ``subject_second`` are the two accuracies
it averages. Two probes per layer: logistic regression (``linear``) and one hidden layer of 256 (``mlp``), which
can combine order and voice where a linear probe cannot. The reference ``order_and_words`` is the sentence's
bag of tokens beside whether the token is the first color word: it holds the roles, as a combination of the
voice and the order that only the ``mlp`` probe can form, and so shows what the probes read when the roles are
there. Prints a markdown table and writes
``{"results": [{"checkpoint", "layer", "probe", "balanced", "subject_first", "subject_second", ...}]}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

from benchmarks.latent_content import load, probe_main, probe_sentences
from modules.losses.bag_of_words import ngram_bag
from text.blocks import COLORS, parse
from text.tokenizer import PAD_ID, trim_padding

PROBES = ("linear", "mlp")


def color_token_ids(tokenizer) -> dict[int, str]:
    """The id of each color word as it stands inside a sentence (after a space); a color the tokenizer splits
    into several tokens is refused, since one token state must stand for the word."""
    found = {}
    for color in COLORS:
        ids = tokenizer.encode(f" {color}").ids
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits the color {color!r} into {len(ids)} tokens; the probe reads one")
        found[ids[0]] = color
    return found


def role_tokens(sentences: list[str], ids: torch.Tensor, colors: dict[int, str]) -> torch.Tensor:
    """``[T, 4]`` rows ``(sentence, position, is_subject, subject_first)`` for every color token of the sentences
    that name two groups of different colors and one relation between them; ``subject_first`` says whether the
    subject's color is the first color word of the sentence."""
    rows = []
    for row, sentence in enumerate(sentences):
        scene = parse(sentence)
        if len(scene.groups) != 2 or len(scene.relations) != 1:
            continue
        relation = scene.relations[0]
        subject, reference = relation.subject[0], relation.reference[0]
        if subject == reference:
            continue
        named = [(position, colors[token]) for position, token in enumerate(ids[row].tolist()) if token in colors]
        subject_first = int(named[0][1] == subject)
        rows += [(row, position, int(color == subject), subject_first) for position, color in named]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


@torch.no_grad()
def layer_states(model, ids: torch.Tensor, tokens: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """The states ``[T, dim]`` at ``tokens``' positions after each block (``layer_k``, before the final LayerNorm)
    and before the first (``layer_0``), read with forward hooks on the checkpoint's Transformer."""
    transformer = model.encoder.encoder
    captured: list[torch.Tensor] = []
    modules = [transformer.embedding_dropout, *transformer.blocks]
    handles = [module.register_forward_hook(lambda _, __, output: captured.append(output)) for module in modules]
    per_layer: list[list[torch.Tensor]] = [[] for _ in modules]
    try:
        for start in range(0, len(ids), batch):
            chunk = trim_padding(ids[start:start + batch])
            selected = tokens[(tokens[:, 0] >= start) & (tokens[:, 0] < start + len(chunk))]
            captured.clear()
            transformer(chunk, chunk != PAD_ID)
            for layer, states in enumerate(captured):
                per_layer[layer].append(states[selected[:, 0] - start, selected[:, 1]])
    finally:
        for handle in handles:
            handle.remove()
    return {f"layer_{layer}": torch.cat(states) for layer, states in enumerate(per_layer)}


def order_and_words(ids: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[T, vocab + 1]``: each token's sentence as a bag of tokens, and 1 where it is its sentence's first color
    word (the reference that holds the roles without reading any state)."""
    first = torch.zeros(len(tokens))
    for index, (row, position) in enumerate(tokens[:, :2].tolist()):
        first[index] = float(position == tokens[tokens[:, 0] == row, 1].min())
    return torch.cat([ngram_bag(ids, PAD_ID, 1, vocab_size)[tokens[:, 0]], first.unsqueeze(1)], dim=1)


def probe_scores(kind: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_tokens: torch.Tensor, steps: int, seed: int) -> dict[str, float]:
    """A probe of ``kind`` fitted on standardized inputs (Adam, L2) and its accuracies on the test tokens."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    width = train_x.shape[1]
    probe = (torch.nn.Linear(width, 1) if kind == "linear" else
             torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3 if kind == "mlp" else 1e-2, weight_decay=1e-4)
    target = train_y.float()
    for _ in range(steps):
        rows = torch.randint(len(train_x), (1024,))
        loss = F.binary_cross_entropy_with_logits(probe(train_x[rows]).squeeze(-1), target[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = ((probe(test_x).squeeze(-1) > 0).long() == test_tokens[:, 2]).float()
    first, second = right[test_tokens[:, 3] == 1].mean(), right[test_tokens[:, 3] == 0].mean()
    return {"balanced": float((first + second) / 2), "subject_first": float(first), "subject_second": float(second)}


def measure(name: str, checkpoint: str, examples: int, steps: int, seed: int) -> list[dict]:
    start = time.perf_counter()
    model, datamodule = load(checkpoint)
    colors = color_token_ids(datamodule.tokenizer)
    train_ids, train_sentences, test_ids, test_sentences = probe_sentences(datamodule, examples, seed)
    train_tokens = role_tokens(train_sentences, train_ids, colors)
    test_tokens = role_tokens(test_sentences, test_ids, colors)
    train, test = layer_states(model, train_ids, train_tokens), layer_states(model, test_ids, test_tokens)
    vocab = datamodule.vocab_size
    train["order_and_words"] = order_and_words(train_ids, train_tokens, vocab)
    test["order_and_words"] = order_and_words(test_ids, test_tokens, vocab)
    sizes = {"train_tokens": len(train_tokens), "test_tokens": len(test_tokens),
             "test_sentences": len(set(test_tokens[:, 0].tolist())),
             "test_subject_second_share": float((test_tokens[:, 3] == 0).float().mean())}
    rows = [{"checkpoint": name, "layer": layer, "probe": kind,
             **probe_scores(kind, train[layer], train_tokens[:, 2], test[layer], test_tokens, steps, seed), **sizes}
            for layer in train for kind in PROBES]
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| checkpoint | layer | probe | balanced | subject first | subject second |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['checkpoint']} | {r['layer']} | {r['probe']} | {r['balanced']:.3f} | {r['subject_first']:.3f} | "
              f"{r['subject_second']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    probe_main(__doc__, measure, table)


if __name__ == "__main__":
    main()
