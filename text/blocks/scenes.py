"""Scene graphs of the blocks-world corpus (spec 004, section 0 "Dataset & Views").

A scene is a set of object groups (color, shape, count) and asymmetric spatial relations between
groups. Scenes are stored canonically: groups and relations are sorted, and every relation is kept
in its canonical direction (``under(a, b)`` is stored as ``on(b, a)``), so two sentences with the
same meaning parse to equal scenes. Splits come from a stable hash of the canonical key, so a scene
belongs to the same split in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

COLORS = ("black", "blue", "green", "orange", "purple", "red", "white", "yellow")
SHAPES = ("ball", "cube", "cylinder", "plank", "ring")
COUNTS = (1, 2, 3)
RELATIONS = ("in_front_of", "left_of", "on")
INVERSE_RELATIONS = {"behind": "in_front_of", "right_of": "left_of", "under": "on"}
SPLITS = ("train", "val", "test")
# Cumulative percent bounds of the hash buckets: 80/10/10.
SPLIT_BOUNDS = (("train", 80), ("val", 90), ("test", 100))
# The spec's meaning-breaking edits (section 0), the kinds of the evaluation pack's counterfactuals.
COUNTERFACTUAL_KINDS = ("color", "relation", "count", "swap_arguments")
# Every edit ``counterfactual`` makes: the spec's and a shape flip, since no spec edit changes a shape and
# a latent can then meet its shape-synonym views ("cube"/"block") by dropping the shape altogether.
EDIT_KINDS = (*COUNTERFACTUAL_KINDS, "shape")

Ref = tuple[str, str]


@dataclass(frozen=True)
class Group:
    """``count`` objects of one color and shape; ``(color, shape)`` names the group within its scene."""

    color: str
    shape: str
    count: int

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS}, got {self.count!r}")

    @property
    def ref(self) -> Ref:
        return (self.color, self.shape)

    def key(self) -> tuple[str, str, int]:
        return (self.color, self.shape, self.count)


@dataclass(frozen=True)
class Relation:
    """``name(subject, reference)`` reads "subject is <name> reference", e.g. ``on(a, b)``: a is on b.

    Inverse names (under, right_of, behind) are accepted and stored as their canonical relation with
    the arguments swapped, so ``Relation("under", a, b) == Relation("on", b, a)``.
    """

    name: str
    subject: Ref
    reference: Ref

    def __post_init__(self) -> None:
        subject, reference = tuple(self.subject), tuple(self.reference)
        if self.name in INVERSE_RELATIONS:
            object.__setattr__(self, "name", INVERSE_RELATIONS[self.name])
            subject, reference = reference, subject
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "reference", reference)
        if self.name not in RELATIONS:
            raise ValueError(
                f"relation name must be one of {RELATIONS + tuple(INVERSE_RELATIONS)}, got {self.name!r}"
            )
        if subject == reference:
            raise ValueError(f"relation {self.name!r} needs two different groups, got {subject} twice")

    def key(self) -> tuple[str, str, str, str, str]:
        return (self.name, *self.subject, *self.reference)


@dataclass(frozen=True)
class Scene:
    """A scene graph in canonical form: groups sorted, relations canonical, sorted and de-duplicated."""

    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()

    def __post_init__(self) -> None:
        groups = tuple(sorted(self.groups, key=Group.key))
        relations = tuple(sorted(set(self.relations), key=Relation.key))
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "relations", relations)
        if not groups:
            raise ValueError("a scene needs at least one group, got groups=()")
        refs = [group.ref for group in groups]
        if len(set(refs)) != len(refs):
            raise ValueError(f"each (color, shape) may name only one group, got groups {refs}")
        for relation in relations:
            for ref in (relation.subject, relation.reference):
                if ref not in refs:
                    raise ValueError(f"relation {relation.key()} refers to {ref}, not a group of {refs}")

    def key(self) -> tuple[tuple[tuple[str, str, int], ...], tuple[tuple[str, str, str, str, str], ...]]:
        """Canonical, hashable identity: equal keys mean equal meaning."""
        return (tuple(group.key() for group in self.groups), tuple(r.key() for r in self.relations))

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {
            "groups": [list(group.key()) for group in self.groups],
            "relations": [list(relation.key()) for relation in self.relations],
        }

    @classmethod
    def from_json(cls, data: dict[str, list[list[Any]]]) -> Scene:
        groups = tuple(Group(color, shape, count) for color, shape, count in data["groups"])
        relations = tuple(Relation(name, (c1, s1), (c2, s2)) for name, c1, s1, c2, s2 in data["relations"])
        return cls(groups, relations)


def scene_split(scene: Scene) -> str:
    """The split a scene belongs to, from a hash that is stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(json.dumps(scene.key()).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return next(split for split, bound in SPLIT_BOUNDS if bucket < bound)


def sample_scene(rng: random.Random) -> Scene:
    """2-3 groups with distinct (color, shape) and 1-2 relations, each between a different pair."""
    num_groups = rng.choice((2, 3))
    refs = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], num_groups)
    groups = tuple(Group(color, shape, rng.choice(COUNTS)) for color, shape in refs)
    pairs = [(first, second) for i, first in enumerate(refs) for second in refs[i + 1 :]]
    # Two relations on one pair would mostly contradict each other ("a is on b and a is left of b").
    num_relations = 1 if num_groups == 2 else rng.choice((1, 2))
    relations = []
    for first, second in rng.sample(pairs, num_relations):
        subject, reference = (first, second) if rng.random() < 0.5 else (second, first)
        relations.append(Relation(rng.choice(RELATIONS), subject, reference))
    return Scene(groups, tuple(relations))


def sample_scenes(num: int, seed: int, split: str) -> list[Scene]:
    """``num`` distinct scenes of one split, the same list for the same seed."""
    return distinct_scenes(num, random.Random(seed), split)


def distinct_scenes(num: int, rng: random.Random, split: str) -> list[Scene]:
    """``num`` distinct scenes of one split, drawn from ``rng`` in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    scenes: dict[Scene, None] = {}
    while len(scenes) < num:
        scene = sample_scene(rng)
        if scene_split(scene) == split:
            scenes[scene] = None
    return list(scenes)


def counterfactual(scene: Scene, kind: str, rng: random.Random) -> Scene:
    """A scene whose graph differs from ``scene`` by one meaning-breaking edit of the given kind.

    Spec 004 section 0: flip a color (to one unused in the scene, keeping (color, shape) unique),
    flip a relation to a different one, change a count, or swap a relation's arguments; beyond the
    spec, ``"shape"`` flips a group's shape (to one its color does not already name).
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {EDIT_KINDS}, got {kind!r}")
    return _EDITS[kind](scene, rng)


def check_edit_kinds(kinds: tuple[str, ...] | list[str], name: str = "counterfactual kinds") -> None:
    """Refuse ``kinds`` unless it is a non-empty list of ``EDIT_KINDS`` names; ``name`` says whose it is."""
    if not kinds or any(kind not in EDIT_KINDS for kind in kinds):
        raise ValueError(f"{name} must be a non-empty subset of {EDIT_KINDS}, got {list(kinds)}")


def _recolor(scene: Scene, rng: random.Random) -> Scene:
    used = {group.color for group in scene.groups}
    free = [color for color in COLORS if color not in used]
    if not free:
        raise ValueError(f"scene {scene.key()} uses every color, so no color can be flipped")
    old = rng.choice(scene.groups)
    return _renamed(scene, old, replace(old, color=rng.choice(free)))


def _reshape(scene: Scene, rng: random.Random) -> Scene:
    old = rng.choice(scene.groups)
    used = {group.ref for group in scene.groups}
    free = [shape for shape in SHAPES if (old.color, shape) not in used]
    if not free:
        raise ValueError(f"scene {scene.key()} names every shape in {old.color}, so no shape can be flipped")
    return _renamed(scene, old, replace(old, shape=rng.choice(free)))


def _renamed(scene: Scene, old: Group, new: Group) -> Scene:
    """``scene`` with group ``old`` replaced by ``new``, its relations following the new name."""
    renamed = {old.ref: new.ref}
    groups = tuple(new if group == old else group for group in scene.groups)
    relations = tuple(
        Relation(r.name, renamed.get(r.subject, r.subject), renamed.get(r.reference, r.reference))
        for r in scene.relations
    )
    return Scene(groups, relations)


def _recount(scene: Scene, rng: random.Random) -> Scene:
    old = rng.choice(scene.groups)
    new = replace(old, count=rng.choice([count for count in COUNTS if count != old.count]))
    return Scene(tuple(new if group == old else group for group in scene.groups), scene.relations)


def _pick_relation(scene: Scene, kind: str, rng: random.Random) -> Relation:
    if not scene.relations:
        raise ValueError(f"scene {scene.key()} has no relation, so no {kind!r} counterfactual exists")
    return rng.choice(scene.relations)


def _rename_relation(scene: Scene, rng: random.Random) -> Scene:
    old = _pick_relation(scene, "relation", rng)
    new = Relation(rng.choice([name for name in RELATIONS if name != old.name]), old.subject, old.reference)
    return Scene(scene.groups, tuple(new if r == old else r for r in scene.relations))


def _swap_arguments(scene: Scene, rng: random.Random) -> Scene:
    old = _pick_relation(scene, "swap_arguments", rng)
    new = Relation(old.name, old.reference, old.subject)
    return Scene(scene.groups, tuple(new if r == old else r for r in scene.relations))


_EDITS: dict[str, Callable[[Scene, random.Random], Scene]] = {
    "color": _recolor,
    "relation": _rename_relation,
    "count": _recount,
    "swap_arguments": _swap_arguments,
    "shape": _reshape,
}
