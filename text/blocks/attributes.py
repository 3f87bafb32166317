"""Binary attributes of two-group block-world scenes: the default data of attribute transfer (spec 001,
issue 11).

Every scene has two groups, A and B, and one relation between them. A schema names five binary
attributes, each a fact of the scene with two values (group A red or blue, ...); the facts it leaves
free (group B's shape and count, the wording) are the item's identity. A counterfactual keeps the
identity and the wording and changes only the attribute facts, so it is the true image of the item
under an attribute transfer, and the rule-based parser reads the attributes back from any sentence.

Wording is held per role (A, B, the relation) rather than per position of the canonical scene: a
counterfactual can re-sort the groups (a blue group sorts after a green one), and the wording must
follow the group, not the position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product

from text.blocks.parser import parse
from text.blocks.scenes import COUNTS, SHAPES, Group, Relation, Scene
from text.blocks.sentences import CHOICE_RANGE, MAX_GROUPS, MAX_RELATIONS, Style, realize

FACTS = ("a_color", "a_shape", "a_count", "relation", "a_is_subject", "b_color", "b_shape", "b_count")


@dataclass(frozen=True)
class Facts:
    """Everything a sentence of the schema says. ``a_is_subject``: the relation reads "A <relation> B"
    (else "B <relation> A")."""

    a_color: str
    a_shape: str
    a_count: int
    relation: str
    a_is_subject: bool
    b_color: str
    b_shape: str
    b_count: int

    def scene(self) -> Scene:
        a = Group(self.a_color, self.a_shape, self.a_count)
        b = Group(self.b_color, self.b_shape, self.b_count)
        subject, reference = (a, b) if self.a_is_subject else (b, a)
        return Scene((a, b), (Relation(self.relation, subject.ref, reference.ref),))


@dataclass(frozen=True)
class Attribute:
    """A binary attribute: the fact it sets and that fact's values for 0 and 1."""

    name: str
    fact: str
    values: tuple


@dataclass(frozen=True)
class Schema:
    """The attributes, and the values each remaining fact (the identity) is drawn from."""

    attributes: tuple[Attribute, ...]
    free: dict

    def __post_init__(self) -> None:
        named = [attribute.fact for attribute in self.attributes] + list(self.free)
        if sorted(named) != sorted(FACTS):
            raise ValueError(f"a schema must set each of {FACTS} once, by an attribute or as free; "
                             f"got {named}")
        if not set(self.fact_values("a_color")).isdisjoint(self.fact_values("b_color")):
            raise ValueError("group A's and group B's colors must differ, so that a sentence tells "
                             "the groups apart")

    @property
    def names(self) -> list[str]:
        return [attribute.name for attribute in self.attributes]

    def fact_values(self, fact: str) -> tuple:
        attribute = next((a for a in self.attributes if a.fact == fact), None)
        return attribute.values if attribute is not None else tuple(self.free[fact])


DEFAULT_SCHEMA = Schema(
    attributes=(
        Attribute("a_blue", "a_color", ("red", "blue")),
        Attribute("a_ball", "a_shape", ("cube", "ball")),
        Attribute("a_pair", "a_count", (1, 2)),
        Attribute("left_of", "relation", ("on", "left_of")),
        Attribute("b_yellow", "b_color", ("green", "yellow")),
    ),
    free={"a_is_subject": (True,), "b_shape": SHAPES, "b_count": COUNTS},
)


@dataclass(frozen=True)
class Wording:
    """The surface choices of a sentence by role (indices into the realizer's vocabularies, see ``Style``)."""

    voice: int
    relation_word: int
    a_number_word: int
    b_number_word: int
    a_shape_word: int
    b_shape_word: int


@dataclass(frozen=True)
class AttributeItem:
    """One sentence of the schema: its facts and its wording."""

    facts: Facts
    wording: Wording

    @property
    def scene(self) -> Scene:
        return self.facts.scene()

    @property
    def style(self) -> Style:
        """The realizer's style, its per-group choices placed where the canonical scene sorts A and B."""
        scene, facts, wording = self.scene, self.facts, self.wording
        a_first = scene.groups[0].ref == (facts.a_color, facts.a_shape)
        number_words = (wording.a_number_word, wording.b_number_word)
        shape_words = (wording.a_shape_word, wording.b_shape_word)
        order = slice(None) if a_first else slice(None, None, -1)
        return Style(clause_order=(0, 1), voices=(wording.voice,) * MAX_RELATIONS,
                     relation_words=(wording.relation_word,) * MAX_RELATIONS, connective=0,
                     existence_template=0,
                     number_words=number_words[order] + (0,) * (MAX_GROUPS - 2),
                     shape_words=shape_words[order] + (0,) * (MAX_GROUPS - 2))

    @property
    def sentence(self) -> str:
        return realize(self.scene, self.style)


def attribute_vector(schema: Schema, facts: Facts) -> list[int]:
    """The schema's attributes of ``facts``, 0 or 1 each."""
    return [attribute.values.index(getattr(facts, attribute.fact)) for attribute in schema.attributes]


def with_attributes(schema: Schema, item: AttributeItem, target: Sequence[int | float]) -> AttributeItem:
    """``item`` with the attribute facts set to ``target`` (0/1 per attribute), identity and wording kept."""
    if len(target) != len(schema.attributes):
        raise ValueError(f"target has {len(target)} values but the schema has attributes {schema.names}")
    if any(value not in (0, 1) for value in target):
        raise ValueError(f"target must be 0/1 per attribute, got {list(target)}")
    changes = {attribute.fact: attribute.values[int(value)]
               for attribute, value in zip(schema.attributes, target)}
    return replace(item, facts=replace(item.facts, **changes))


def counterfactual(schema: Schema, item: AttributeItem, target: Sequence[int | float]) -> str:
    """The sentence of the same identity and wording with the ``target`` attributes."""
    return with_attributes(schema, item, target).sentence


def read_facts(schema: Schema, sentence: str) -> Facts:
    """The facts of a sentence of the schema, by the rule-based parser (no embedding involved); a
    sentence outside the schema is a ValueError quoting it."""
    scene = parse(sentence)
    a_colors = schema.fact_values("a_color")
    groups_a = [group for group in scene.groups if group.color in a_colors]
    groups_b = [group for group in scene.groups if group.color not in a_colors]
    if len(groups_a) != 1 or len(groups_b) != 1 or len(scene.relations) != 1:
        raise ValueError(f"sentence {sentence!r} is not one group of color {a_colors}, one other group and "
                         "one relation between them")
    (a,), (b,), (relation,) = groups_a, groups_b, scene.relations
    a_is_subject = relation.subject == a.ref
    return Facts(a.color, a.shape, a.count, relation.name, a_is_subject, b.color, b.shape, b.count)


def read_attributes(schema: Schema, sentence: str) -> list[int]:
    """The schema's attributes a sentence states, by the parser; ValueError when a fact lies outside
    the values the schema allows."""
    facts = read_facts(schema, sentence)
    for fact in FACTS:
        if getattr(facts, fact) not in schema.fact_values(fact):
            raise ValueError(f"sentence {sentence!r} has {fact}={getattr(facts, fact)!r}, "
                             f"outside the schema's {schema.fact_values(fact)}")
    return attribute_vector(schema, facts)


def all_facts(schema: Schema) -> list[Facts]:
    """Every scene of the schema, in a fixed order."""
    values = [schema.fact_values(fact) for fact in FACTS]
    return [Facts(*combination) for combination in product(*values)]


def random_wording(rng: random.Random) -> Wording:
    return Wording(*rng.choices(range(CHOICE_RANGE), k=6))


def split_scenes(schema: Schema, fractions: dict[str, float], seed: int) -> dict[str, list[Facts]]:
    """The schema's scenes dealt to splits, no scene in two: within every attribute combination the scenes
    are shuffled and cut by ``fractions`` (each split at least one), so every split has every combination."""
    rng = random.Random(seed)
    by_combination: dict[tuple[int, ...], list[Facts]] = {}
    for facts in all_facts(schema):
        by_combination.setdefault(tuple(attribute_vector(schema, facts)), []).append(facts)
    splits: dict[str, list[Facts]] = {split: [] for split in fractions}
    for scenes in by_combination.values():
        if len(scenes) < len(fractions):
            raise ValueError(f"each attribute combination has {len(scenes)} scenes, too few for the splits "
                             f"{list(fractions)}; the schema must leave more facts free")
        rng.shuffle(scenes)
        counts = [max(1, round(fraction * len(scenes))) for fraction in fractions.values()]
        counts[0] = len(scenes) - sum(counts[1:])  # the first split takes the rest
        start = 0
        for split, count in zip(fractions, counts):
            splits[split] += scenes[start:start + count]
            start += count
    return splits


def sample_items(schema: Schema, sizes: dict[str, int], seed: int) -> dict[str, list[AttributeItem]]:
    """``sizes[split]`` items per split, all sentences distinct, the attribute combination uniform per item
    and then one of that split's scenes of it and a wording; the scenes of a split belong to it alone
    (``split_scenes`` with fractions proportional to the sizes)."""
    total = sum(sizes.values())
    scenes = split_scenes(schema, {split: size / total for split, size in sizes.items()}, seed)
    rng = random.Random(seed + 1)
    items: dict[str, list[AttributeItem]] = {}
    for split, size in sizes.items():
        by_combination: dict[tuple[int, ...], list[Facts]] = {}
        for facts in scenes[split]:
            by_combination.setdefault(tuple(attribute_vector(schema, facts)), []).append(facts)
        combinations = sorted(by_combination)
        found: dict[str, AttributeItem] = {}
        while len(found) < size:
            facts = rng.choice(by_combination[rng.choice(combinations)])
            item = AttributeItem(facts, random_wording(rng))
            found.setdefault(item.sentence, item)
        items[split] = list(found.values())
    return items

