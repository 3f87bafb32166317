"""How fast a spec 004 text-to-latent path can learn to carry a sentence's words, head by head.

    python benchmarks/latent_bandwidth.py --checkpoint runs/p2_contrastive_cpu/checkpoints/last.ckpt \
        --out FILE.json

Every path starts from fresh weights with the architecture, corpus and tokenizer of ``--checkpoint`` (only
the overrides of ``PATHS`` differ) and trains on one objective alone, the bag-of-words term of
``modules.losses.bag_of_words`` on ``z``: a linear head on ``z`` must give every word of the view. No prior,
no InfoNCE: the objective asks for all the content, so what the loss reaches in a fixed budget of steps
measures how much of the sentence the path lets through and how quickly it learns to. ``tokens`` skips the
latent: ``z`` is a linear map of the mean of the Transformer's token states, the same encoder without the
grid; the ``_pixels`` paths read ``V`` through a linear map of all its pixels in place of the readout. The
score is the loss on the held-out validation sentences, beside the two ends of its range: a ``z`` that knows
nothing (the training corpus's word frequencies, ``marginal``) and a ``z`` that knows every word (each
sentence's own bag, ``floor``). Prints a markdown table and writes
``{"results": [{"path", "overrides", "evaluations": [{"step", "loss"}], ...}], "marginal", "floor", ...}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from benchmarks.latent_content import load
from benchmarks.record import write_record
from modules.losses.bag_of_words import bag_of_words_loss, ngram_bag
from modules.networks.text_encoder import MeanTokenEmbedding
from modules.visual_latent import VisualLatentText
from text.tokenizer import PAD_ID, trim_padding

# Per path: the model arguments that differ from the checkpoint's ("tokens" bypasses the grid).
PATHS = {
    "tokens": {},
    "default": {},
    "grid": {"latent_head": "grid"},
    "slots": {"latent_head": "slots"},
    "token_blobs": {"latent_head": "token_blobs"},
    "grid_and_token_blobs": {"latent_head": "grid_and_token_blobs"},
    "raw_maps": {"standardize_maps": False},
    "channels_24": {"channels": 24},
    "pool_8": {"pool_levels": (1, 2, 4, 8)},
    "head_depth_2": {"head_depth": 2},
    "grid_pixels": {"latent_head": "grid"},
    "token_blobs_pixels": {"latent_head": "token_blobs"},
}
# A "_pixels" path's z is a linear map of every pixel of V instead of the readout g(V): what V holds, not what g keeps.


class LatentPath(nn.Module):
    """``z = g(V(x))``, the method's own path through the latent grid."""

    def __init__(self, model: VisualLatentText) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids)


class PixelPath(nn.Module):
    """``z`` = a linear map of all ``C x H x W`` values of ``V(x)``: the latent without the readout's pooling."""

    def __init__(self, model: VisualLatentText) -> None:
        super().__init__()
        self.model = model
        hp = model.hparams
        self.to_embedding = nn.Linear(hp.channels * hp.grid_size**2, hp.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_embedding(self.model.latent(ids).flatten(1))


def fresh_path(name: str, hparams: dict, seed: int) -> tuple[nn.Module, nn.Module]:
    """``(embed, head)``: ``embed`` maps ids to ``z``, ``head`` maps ``z`` to the vocabulary's logits."""
    torch.manual_seed(seed)
    arguments = {k: v for k, v in hparams.items() if k not in ("init_from", "init_prefixes")}
    arguments |= PATHS[name] | {"bag_of_words_weight": 1.0, "bag_of_words_buckets": hparams["vocab_size"]}
    model = VisualLatentText(**arguments)
    if name == "tokens":  # the same Transformer, no grid
        return MeanTokenEmbedding(model.encoder.encoder, model.hparams.embedding_dim), model.bag_of_words
    path = PixelPath if name.endswith("_pixels") else LatentPath
    return path(model), model.bag_of_words


def loss_of(embed: nn.Module, head: nn.Module, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return bag_of_words_loss(head(embed(ids)), ngram_bag(ids, PAD_ID, 1, vocab_size))


def measure(name: str, hparams: dict, views: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int,
            lr: float, every: int, seed: int) -> dict:
    embed, head = fresh_path(name, hparams, seed)
    # the method's path holds the head already; the token path holds only the Transformer and its map
    parameters = list(dict.fromkeys([*embed.parameters(), *head.parameters()]))
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    draws = torch.Generator().manual_seed(seed)
    evaluations, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        embed.train()
        ids = trim_padding(views[torch.randint(0, len(views), (batch,), generator=draws)])
        loss = loss_of(embed, head, ids, hparams["vocab_size"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % every == 0 or step == steps:
            embed.eval()
            with torch.no_grad():
                evaluations.append({"step": step, "loss": loss_of(embed, head, held_out, hparams["vocab_size"]).item()})
    return {"path": name, "overrides": PATHS[name], "evaluations": evaluations,
            "wall_seconds": time.perf_counter() - start}


def range_ends(views: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    """``(marginal, floor)``: the loss of the training corpus's word frequencies and of each sentence's own bag."""
    bag = ngram_bag(held_out, PAD_ID, 1, vocab_size)
    frequencies = ngram_bag(views, PAD_ID, 1, vocab_size).sum(dim=0)
    marginal = bag_of_words_loss(frequencies.clamp(min=1e-3).log().expand_as(bag), bag)
    floor = bag_of_words_loss(bag.clamp(min=1e-9).log(), bag)
    return marginal.item(), floor.item()


def table(results: list[dict], marginal: float, floor: float) -> str:
    steps = [e["step"] for e in results[0]["evaluations"]]
    lines = ["| path | " + " | ".join(f"loss at {s}" for s in steps) + " | share of the range closed | wall s |",
             "|---|" + "---|" * (len(steps) + 2)]
    for r in results:
        losses = [e["loss"] for e in r["evaluations"]]
        closed = (marginal - losses[-1]) / (marginal - floor)
        lines.append(f"| {r['path']} | " + " | ".join(f"{x:.3f}" for x in losses)
                     + f" | {closed:.2f} | {r['wall_seconds']:.0f} |")
    lines.append(f"\nmarginal (knows no word) {marginal:.3f}, floor (knows every word) {floor:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="its architecture, corpus and tokenizer")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint} is not a file")
    torch.set_num_threads(args.threads)
    model, data = load(args.checkpoint)
    hparams = dict(model.hparams)
    saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    # a checkpoint from before the option started its token embeddings at 0.02, the default then
    hparams["token_embedding_std"] = saved.get("token_embedding_std", 0.02)
    views = data.host_tables("train")["views"].flatten(0, 1)
    held_out = trim_padding(data.host_tables("val")["sentence"])
    marginal, floor = range_ends(views, held_out, hparams["vocab_size"])
    results = []
    for name in args.paths:
        results.append(measure(name, hparams, views, held_out, args.steps, args.batch, args.lr, args.every,
                               args.seed))
        print(f"{name}: {results[-1]['evaluations'][-1]['loss']:.3f} in {results[-1]['wall_seconds']:.0f} s",
              flush=True)
    print(table(results, marginal, floor))
    write_record(args.out, {"results": results, "marginal": marginal, "floor": floor, "steps": args.steps,
                            "batch": args.batch, "lr": args.lr, "seed": args.seed}, args.threads)


if __name__ == "__main__":
    main()
