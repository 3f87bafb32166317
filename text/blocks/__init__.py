"""Blocks-world corpus: scene graphs, their sentences, meaning-preserving views, counterfactuals,
a rule-based parser and the fixed evaluation pack (spec 004, section 0)."""

from __future__ import annotations

from text.blocks.parser import parse
from text.blocks.scenes import (
    COLORS,
    COUNTERFACTUAL_KINDS,
    EDIT_KINDS,
    RELATIONS,
    SHAPES,
    SPLITS,
    Group,
    Relation,
    Scene,
    counterfactual,
    sample_scene,
    sample_scenes,
    scene_split,
)
from text.blocks.sentences import (
    VIEW_KINDS,
    Style,
    counterfactual_sentence,
    paraphrase,
    random_style,
    realize,
    training_examples,
    view,
)

__all__ = [
    "COLORS",
    "COUNTERFACTUAL_KINDS",
    "EDIT_KINDS",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "VIEW_KINDS",
    "Group",
    "Relation",
    "Scene",
    "Style",
    "build_eval_pack",
    "counterfactual",
    "counterfactual_sentence",
    "load_eval_pack",
    "paraphrase",
    "parse",
    "random_style",
    "realize",
    "sample_scene",
    "sample_scenes",
    "scene_split",
    "training_examples",
    "view",
]


def __getattr__(name: str) -> object:
    # Imported on first use so that ``python -m text.blocks.eval_pack`` does not find the module
    # already imported by its own package.
    if name in ("build_eval_pack", "load_eval_pack"):
        from text.blocks import eval_pack

        return getattr(eval_pack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
