"""What a spec 004 encoder's latent holds: linear probes of a scene's content from ``z = g(V)``, from the
whole grid ``V``, from the mean of the Transformer's token states (the grid head reads each of them) and, as the
reference that has every word but not their order, from the sentence's bag of tokens.

    python benchmarks/latent_content.py --checkpoints p3=runs/p3_invariance_cpu/checkpoints/last.ckpt \
        --out FILE.json

A probe is a logistic regression per target, trained on the latents of the checkpoint's own training
views (its corpus, rebuilt from the checkpoint's data arguments) and scored on the held-out validation
sentences and their paraphrases. Targets, read from each sentence by the corpus parser: which colors occur,
which shapes occur, which (color, shape) groups occur (the binding of a color to its shape), and which
relation names occur, and which color is the subject of which relation (``r(a, b)``: a's color; the
canonical relation, so the inverse voice names the same subject). The score is the area under the ROC curve
averaged over a family's labels (0.5 is chance, 1 a perfect reading; torchmetrics' ``multilabel_auroc``).
Who is related to whom gets a second score that colors alone cannot earn, ``role_accuracy``: over the held-out
relations whose two groups differ in color, the share where the probe scores the subject's color above the
reference's for that relation (0.5 is chance; a bag of tokens cannot tell "a on b" from "b on a"). P4's
decoder can only write what its latent holds, so a family the probe cannot read from ``V`` bounds P4's
content accuracy. Prints a markdown table and writes
``{"results": [{"checkpoint", "features", "family", "auroc" (or, for family "role", "role_accuracy"), ...}]}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multilabel_auroc

from benchmarks.record import write_record
from datamodules.blocks_text import BlocksTextDataModule
from modules.losses.bag_of_words import ngram_bag
from modules.networks.text_encoder import mean_token_state
from modules.visual_latent import VisualLatentText
from text.blocks import COLORS, RELATIONS, SHAPES, parse
from text.tokenizer import PAD_ID, trim_padding

GROUPS = tuple((color, shape) for color in COLORS for shape in SHAPES)
SUBJECTS = tuple((relation, color) for relation in RELATIONS for color in COLORS)
LABELS = {"color": COLORS, "shape": SHAPES, "color_shape": GROUPS, "relation": RELATIONS, "subject": SUBJECTS}
OFFSETS = dict(zip(LABELS, itertools.accumulate((len(names) for names in LABELS.values()), initial=0)))
FAMILIES = {family: slice(OFFSETS[family], OFFSETS[family] + len(names)) for family, names in LABELS.items()}
FEATURES = ("z", "V", "token_states", "bag_of_tokens")


def content_labels(sentences: list[str]) -> torch.Tensor:
    """``[N, labels]`` 0/1: the colors, shapes, (color, shape) groups, relation names and (relation, subject
    color) pairs of each parsed sentence, in the column ranges of ``FAMILIES``."""
    labels = torch.zeros(len(sentences), sum(len(names) for names in LABELS.values()))
    for row, sentence in enumerate(sentences):
        scene = parse(sentence)
        named = {"color": [g.color for g in scene.groups], "shape": [g.shape for g in scene.groups],
                 "color_shape": [g.ref for g in scene.groups], "relation": [r.name for r in scene.relations],
                 "subject": [(r.name, r.subject[0]) for r in scene.relations]}
        for family, values in named.items():
            labels[row, [OFFSETS[family] + LABELS[family].index(value) for value in values]] = 1
    return labels


def load(checkpoint: str) -> tuple[VisualLatentText, BlocksTextDataModule]:
    """The checkpoint's model (its averaged weights) and its datamodule, tokenizer included."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    arguments = {k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = BlocksTextDataModule(**arguments)
    datamodule.load_state_dict(state["BlocksTextDataModule"])
    datamodule.setup("fit")
    model = VisualLatentText.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return model, datamodule


@torch.no_grad()
def features(model: VisualLatentText, ids: torch.Tensor, vocab_size: int, batch: int = 256) -> dict[str, torch.Tensor]:
    zs, vs, states = [], [], []
    for start in range(0, len(ids), batch):
        chunk = trim_padding(ids[start:start + batch])
        real = chunk != PAD_ID
        tokens = model.encoder.encoder(chunk, real)
        v = model.encoder.paint(tokens, real)  # as model.latent(chunk), the Transformer run once
        zs.append(model.readout(v))
        vs.append(v.flatten(1))
        states.append(mean_token_state(tokens, real))
    bag = ngram_bag(ids, PAD_ID, 1, vocab_size)
    return {"z": torch.cat(zs), "V": torch.cat(vs), "token_states": torch.cat(states), "bag_of_tokens": bag}


def role_pairs(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every relation of a parsed sentence whose two groups differ in color: the sentence's row and the
    ``subject``-family columns of (relation, subject color) and (relation, reference color). A pair whose
    reference column is itself a true label (a chain ``on(a, b), on(b, c)``) is left out, since no score could
    order it, and a pair is counted once per sentence."""
    pairs = []
    for row, sentence in enumerate(sentences):
        relations = parse(sentence).relations
        subjects = {(relation.name, relation.subject[0]) for relation in relations}
        for relation in relations:
            reference = (relation.name, relation.reference[0])
            if relation.subject[0] != relation.reference[0] and reference not in subjects:
                subject = SUBJECTS.index((relation.name, relation.subject[0]))
                pairs.append((row, subject, SUBJECTS.index(reference)))
    rows, subject, reference = torch.tensor(sorted(set(pairs)), dtype=torch.long).reshape(-1, 3).unbind(1)
    return rows, subject, reference


def role_accuracy(scores: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """The share of ``role_pairs`` where the subject's column outscores the reference's (ties count half)."""
    rows, subject, reference = pairs
    roles = scores[:, FAMILIES["subject"]]
    margin = roles[rows, subject] - roles[rows, reference]
    return float((margin > 0).float().mean() + 0.5 * (margin == 0).float().mean())


def probe_auroc(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                steps: int, seed: int, pairs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Per family, the macro AUROC of a multi-label logistic regression (standardized inputs, Adam, L2), and
    its ``role_accuracy`` on the test sentences' ``pairs``."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(train_x.shape[1], train_y.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        rows = torch.randint(len(train_x), (2048,))
        loss = F.binary_cross_entropy_with_logits(probe(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = probe(test_x)
    return {**{family: float(multilabel_auroc(scores[:, columns], test_y[:, columns].int(),
                                              columns.stop - columns.start, average="macro"))
               for family, columns in FAMILIES.items()},
            "role_accuracy": role_accuracy(scores, pairs)}


def probe_sentences(datamodule: BlocksTextDataModule, examples: int, seed: int
                    ) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """``(train_ids, train_sentences, test_ids, test_sentences)``: ``examples`` of the checkpoint's training views
    drawn under ``seed``, and the held-out validation sentences each followed by its paraphrases; the ids
    ``[N, L]`` right-padded to one width."""
    views = datamodule.host_tables("train")["views"]
    sentences = [s for item in datamodule.train_examples for s in item["views"]]
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:examples]
    train_ids = views.reshape(-1, views.shape[-1])[order]
    val = datamodule.host_tables("val")
    items = datamodule.eval_pack["val"][: len(val["sentence"])]
    test_sentences = [s for item in items for s in (item["sentence"], *item["paraphrases"])]
    test_ids = torch.cat([val["sentence"].unsqueeze(1), val["paraphrases"]], dim=1).flatten(0, 1)
    width = max(train_ids.shape[1], test_ids.shape[1])
    train_ids, test_ids = (F.pad(ids, (0, width - ids.shape[1])) for ids in (train_ids, test_ids))
    return train_ids, [sentences[i] for i in order.tolist()], test_ids, test_sentences


def measure(name: str, checkpoint: str, examples: int, steps: int, seed: int) -> list[dict]:
    start = time.perf_counter()
    model, datamodule = load(checkpoint)
    train_ids, train_sentences, test_ids, test_sentences = probe_sentences(datamodule, examples, seed)
    vocab = datamodule.vocab_size
    train = features(model, train_ids, vocab)
    test = features(model, test_ids, vocab)
    train_y = content_labels(train_sentences)
    test_y = content_labels(test_sentences)
    pairs = role_pairs(test_sentences)
    rows = []
    for kind in FEATURES:
        scores = probe_auroc(train[kind], train_y, test[kind], test_y, steps, seed, pairs)
        accuracy = scores.pop("role_accuracy")
        sizes = {"train_sentences": len(train_y), "test_sentences": len(test_y)}
        rows += [{"checkpoint": name, "features": kind, "family": family, "auroc": auroc, **sizes}
                 for family, auroc in scores.items()]
        rows.append({"checkpoint": name, "features": kind, "family": "role", "role_accuracy": accuracy,
                     "test_relations": len(pairs[0]), **sizes})
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    scores = (*FAMILIES, "role")
    lines = ["| checkpoint | features | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores)]
    keys = dict.fromkeys((r["checkpoint"], r["features"]) for r in rows)
    for checkpoint, kind in keys:
        score = {r["family"]: r.get("auroc", r.get("role_accuracy"))
                 for r in rows if (r["checkpoint"], r["features"]) == (checkpoint, kind)}
        lines.append(f"| {checkpoint} | {kind} | " + " | ".join(f"{score[f]:.3f}" for f in scores) + " |")
    return "\n".join(lines)


def probe_main(description: str, measure, table) -> None:
    """The command line of the checkpoint probes (this one and ``benchmarks/token_roles.py``): ``measure(name,
    path, examples, steps, seed)`` gives each checkpoint's rows, ``table(rows)`` prints them; ``--out`` gets the
    JSON record."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--examples", type=int, default=12000, help="training views the probes fit on")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for entry in args.checkpoints:
        name, sep, path = entry.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"--checkpoints wants NAME=PATH with an existing checkpoint file, got {entry!r}")
        rows += measure(name, path, args.examples, args.steps, args.seed)
    print(table(rows))
    write_record(args.out, {"results": rows, "examples": args.examples, "steps": args.steps, "seed": args.seed},
                 args.threads)


def main() -> None:
    probe_main(__doc__, measure, table)


if __name__ == "__main__":
    main()
