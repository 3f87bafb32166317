"""The fixed evaluation pack: sentences with paraphrases and counterfactuals (spec 004 section 0).

Val items come from val-split scenes and test items from test-split scenes, so the pack never
overlaps the training corpus. ``montage`` holds the 16 fixed sentences whose latent channels are
plotted every epoch. The pack ships as ``eval_pack.json`` next to this module; regenerate it with
``python -m text.blocks.eval_pack --out text/blocks/eval_pack.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from importlib import resources
from typing import Any

from text.blocks.scenes import COUNTERFACTUAL_KINDS, Scene, distinct_scenes
from text.blocks.sentences import (
    MAX_DISTINCT_SENTENCES,
    counterfactual_sentence,
    distinct_realizations,
)

EVAL_PACK_VERSION = 1
EVAL_PACK_FILE = "eval_pack.json"
MONTAGE_SIZE = 16


def build_eval_pack(seed: int = 0, size: int = 256, paraphrases: int = 4) -> dict[str, Any]:
    """``size`` items per split; each has ``paraphrases`` distinct paraphrases and a counterfactual per kind.

    Counterfactuals are minimal pairs with the item's sentence (see ``counterfactual_sentence``).
    """
    if size < MONTAGE_SIZE:
        raise ValueError(f"size must be at least {MONTAGE_SIZE} to fill the montage, got {size}")
    if not 1 <= paraphrases < MAX_DISTINCT_SENTENCES:
        raise ValueError(f"paraphrases must be in [1, {MAX_DISTINCT_SENTENCES - 1}], got {paraphrases}")
    rng = random.Random(seed)
    val = [_item(scene, paraphrases, rng) for scene in distinct_scenes(size, rng, "val")]
    test = [_item(scene, paraphrases, rng) for scene in distinct_scenes(size, rng, "test")]
    montage = [item["sentence"] for item in val[:MONTAGE_SIZE]]
    return {"version": EVAL_PACK_VERSION, "seed": seed, "val": val, "test": test, "montage": montage}


def _item(scene: Scene, num_paraphrases: int, rng: random.Random) -> dict[str, Any]:
    (sentence, style), *paraphrases = distinct_realizations(scene, 1 + num_paraphrases, rng)
    counterfactuals = [counterfactual_sentence(scene, style, kind, rng) for kind in COUNTERFACTUAL_KINDS]
    return {
        "sentence": sentence,
        "paraphrases": [paraphrase for paraphrase, _ in paraphrases],
        "counterfactuals": counterfactuals,
        "counterfactual_kinds": list(COUNTERFACTUAL_KINDS),
        "graph": scene.to_json(),
    }


def load_eval_pack() -> dict[str, Any]:
    """The shipped evaluation pack."""
    return json.loads(resources.files(__package__).joinpath(EVAL_PACK_FILE).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the blocks-world evaluation pack as JSON.")
    parser.add_argument("--out", required=True, help="path of the JSON file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="items per split (val and test)")
    parser.add_argument("--paraphrases", type=int, default=4, help="paraphrases per item")
    args = parser.parse_args(argv)
    pack = build_eval_pack(args.seed, args.size, args.paraphrases)
    with open(args.out, "w", encoding="utf-8") as file:
        file.write(format_eval_pack(pack))


def format_eval_pack(pack: dict[str, Any]) -> str:
    """JSON with one list entry per line: compact, yet a regenerated pack diffs item by item."""
    fields = []
    for key, value in pack.items():
        if isinstance(value, list):
            entries = ",\n  ".join(json.dumps(entry) for entry in value)
            fields.append(f" {json.dumps(key)}: [\n  {entries}\n ]")
        else:
            fields.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


if __name__ == "__main__":
    main()
