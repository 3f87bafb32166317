"""Realizing scene graphs as sentences, and meaning-preserving views (spec 004, section 0).

A sentence is one or two clauses joined by a connective: a relation clause per relation ("two red
cubes are on a blue ball") and an existence clause per group in no relation ("there is also a white
plank"). A group's first mention carries its count; later mentions are definite ("the red cubes").

``Style`` holds every surface choice. Its indices pick from the vocabulary lists below modulo their
length, so one style fits every scene (and its counterfactuals) and each view kind can re-draw its
own choices without touching the others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TypeVar

from text.blocks.scenes import (
    COLORS,
    COUNTERFACTUAL_KINDS,
    Group,
    Ref,
    Relation,
    Scene,
    check_edit_kinds,
    counterfactual,
    distinct_scenes,
)

T = TypeVar("T")

MAX_GROUPS = 3
MAX_RELATIONS = 2
MAX_CLAUSES = 2
# Every vocabulary list has 1, 2, 3 or 4 entries, all divisors of 12, so a choice drawn from
# range(12) stays uniform after the modulo.
CHOICE_RANGE = 12

NUMBER_WORDS = {
    1: ("a", "one", "a single"),
    2: ("two", "2", "a pair of"),
    3: ("three", "3", "a trio of"),
}
SHAPE_NAMES = {
    "ball": ("ball", "sphere"),
    "cube": ("cube", "block"),
    "cylinder": ("cylinder", "tube"),
    "plank": ("plank", "board"),
    "ring": ("ring", "hoop"),
}
CONNECTIVES = (", and ", ", while ", " and ")
EXISTENCE_TEMPLATES = ("there {be} {also}{noun}", "{noun} {be} {also}present")


@dataclass(frozen=True)
class Voice:
    """One way to phrase a relation.

    reference_first: the sentence names the relation's reference before its subject ("b is under a"
    for on(a, b)). is_verb: the phrase is a verb that agrees with its subject ("supports"/"support")
    rather than a complement of "is"/"are".
    """

    phrases: tuple[str, ...]
    reference_first: bool
    is_verb: bool


# Voices alternate subject-first and reference-first, so a voice choice keeps its argument order when
# a counterfactual changes the relation.
RELATION_VOICES = {
    "on": (
        Voice(("on", "on top of", "resting on", "sitting on"), reference_first=False, is_verb=False),
        Voice(("under", "underneath", "below", "beneath"), reference_first=True, is_verb=False),
        Voice(("supported by", "held up by"), reference_first=False, is_verb=False),
        Voice(("supports", "holds up"), reference_first=True, is_verb=True),
    ),
    "left_of": (
        Voice(("left of", "to the left of", "on the left of"), reference_first=False, is_verb=False),
        Voice(("right of", "to the right of", "on the right of"), reference_first=True, is_verb=False),
    ),
    "in_front_of": (
        Voice(("in front of", "ahead of"), reference_first=False, is_verb=False),
        Voice(("behind", "in back of"), reference_first=True, is_verb=False),
        Voice(("hides", "blocks"), reference_first=False, is_verb=True),
        Voice(("hidden by", "blocked by"), reference_first=True, is_verb=False),
    ),
}


# Words that glue content together rather than carry it (spec 004 P4 "content vs function words"): a
# relation phrase's articles and prepositions, the copulas, the connectives and the existence templates.
GLUE_WORDS = frozenset({"a", "an", "the", "of", "to", "in", "by", "is", "are", "and", "while", "there", "also",
                        "present"})


CONTENT_KINDS = ("color", "shape", "count", "relation")
# Kind indices of tokens that are not one kind of CONTENT_KINDS: a function token, and a content token of no single
# kind (its word states more than one, as "block" does, or its kind is unknown).
FUNCTION_TOKEN = -1
NO_SINGLE_KIND = len(CONTENT_KINDS)


def content_words_by_kind() -> dict[str, frozenset[str]]:
    """The grammar's words that state a color, a shape, a count or a relation (plurals included), by
    ``CONTENT_KINDS``; glue words are left out, so a kind holds only the words that carry it."""
    shapes = {name + suffix for names in SHAPE_NAMES.values() for name in names for suffix in ("", "s")}
    numbers = {word for words in NUMBER_WORDS.values() for phrase in words for word in phrase.split()}
    relations = {word for voices in RELATION_VOICES.values() for voice in voices for phrase in voice.phrases
                 for form in (phrase, plural_verb(phrase)) for word in form.split()}
    kinds = {"color": set(COLORS), "shape": shapes, "count": numbers, "relation": relations}
    return {kind: frozenset(kinds[kind] - GLUE_WORDS) for kind in CONTENT_KINDS}


def content_words() -> frozenset[str]:
    """Every word of the grammar that states a color, a shape, a count or a relation (plurals included)."""
    return frozenset().union(*content_words_by_kind().values())


def plural_verb(phrase: str) -> str:
    """'holds up' -> 'hold up': the verbs above are regular, so agreement drops the first word's 's'."""
    verb, *rest = phrase.split(" ")
    return " ".join([verb.removesuffix("s"), *rest])


@dataclass(frozen=True)
class Style:
    """All surface choices of a sentence (spec 004 section 0 "Meaning-preserving augmentations").

    clause_order: a permutation of range(MAX_CLAUSES); clauses the scene lacks are skipped.
    voices, relation_words: per relation, in scene order. number_words, shape_words: per group.
    """

    clause_order: tuple[int, ...]
    voices: tuple[int, ...]
    relation_words: tuple[int, ...]
    connective: int
    existence_template: int
    number_words: tuple[int, ...]
    shape_words: tuple[int, ...]

    def __post_init__(self) -> None:
        if sorted(self.clause_order) != list(range(MAX_CLAUSES)):
            raise ValueError(f"clause_order must permute range({MAX_CLAUSES}), got {self.clause_order}")
        lengths = {"voices": MAX_RELATIONS, "relation_words": MAX_RELATIONS}
        lengths |= {"number_words": MAX_GROUPS, "shape_words": MAX_GROUPS}
        for name, length in lengths.items():
            if len(getattr(self, name)) != length:
                raise ValueError(f"{name} needs {length} choices, got {getattr(self, name)}")
        choices = [*self.voices, *self.relation_words, *self.number_words, *self.shape_words]
        if min(choices + [self.connective, self.existence_template]) < 0:
            raise ValueError(f"style choices must be non-negative, got {self}")


VIEW_KINDS = ("conjunct_shuffle", "synonym", "determiner_number", "voice", "renaming")
VIEW_FIELDS = {
    "conjunct_shuffle": ("clause_order",),
    "synonym": ("relation_words", "connective", "existence_template"),
    "determiner_number": ("number_words",),
    "voice": ("voices",),
    "renaming": ("shape_words",),
}
# The smallest scenes still have over a hundred surface forms, so this many distinct ones always exist.
MAX_DISTINCT_SENTENCES = 32
# A view kind has few choices for small scenes, so a re-draw often repeats the sentence; a few
# attempts make the view differ whenever the kind can change it at all, with high probability.
VIEW_ATTEMPTS = 8


def random_style(rng: random.Random) -> Style:
    """Every surface choice drawn uniformly."""
    draws = iter(rng.choices(range(CHOICE_RANGE), k=2 * MAX_RELATIONS + 2 + 2 * MAX_GROUPS))

    def take(num: int) -> tuple[int, ...]:
        return tuple(islice(draws, num))

    return Style(
        clause_order=tuple(rng.sample(range(MAX_CLAUSES), MAX_CLAUSES)),
        voices=take(MAX_RELATIONS),
        relation_words=take(MAX_RELATIONS),
        connective=next(draws),
        existence_template=next(draws),
        number_words=take(MAX_GROUPS),
        shape_words=take(MAX_GROUPS),
    )


def realize(scene: Scene, style: Style) -> str:
    """The sentence for ``scene`` under ``style``: lower case, ending with a period."""
    clauses = _clauses(scene)
    if len(scene.groups) > MAX_GROUPS or len(scene.relations) > MAX_RELATIONS or len(clauses) > MAX_CLAUSES:
        raise ValueError(
            f"scene must have at most {MAX_GROUPS} groups, {MAX_RELATIONS} relations and {MAX_CLAUSES} "
            f"clauses to be realized, got {scene.key()}"
        )
    mentions = _Mentions(scene, style)
    texts = []
    for position, index in enumerate(i for i in style.clause_order if i < len(clauses)):
        clause = clauses[index]
        if isinstance(clause, Relation):
            texts.append(_relation_clause(clause, index, style, mentions))
        else:
            texts.append(_existence_clause(clause, style, mentions, first=position == 0))
    return CONNECTIVES[style.connective % len(CONNECTIVES)].join(texts) + "."


def _clauses(scene: Scene) -> list[Relation | Group]:
    """A clause per relation, in scene order, then an existence clause per group in no relation."""
    related = {ref for relation in scene.relations for ref in (relation.subject, relation.reference)}
    return [*scene.relations, *(group for group in scene.groups if group.ref not in related)]


class _Mentions:
    """Noun phrases in sentence order: a group's first mention gives its count, later ones say "the"."""

    def __init__(self, scene: Scene, style: Style) -> None:
        self.style = style
        self.groups = {group.ref: (index, group) for index, group in enumerate(scene.groups)}
        self.introduced: set[Ref] = set()

    def __call__(self, ref: Ref) -> tuple[str, bool]:
        """The noun phrase for a group and whether it is plural."""
        index, group = self.groups[ref]
        names = SHAPE_NAMES[group.shape]
        name = names[self.style.shape_words[index] % len(names)] + ("s" if group.count > 1 else "")
        if ref in self.introduced:
            return f"the {group.color} {name}", group.count > 1
        self.introduced.add(ref)
        numbers = NUMBER_WORDS[group.count]
        number = numbers[self.style.number_words[index] % len(numbers)]
        if number == "a" and group.color[0] in "aeiou":
            number = "an"
        return f"{number} {group.color} {name}", group.count > 1


def _relation_clause(relation: Relation, index: int, style: Style, mentions: _Mentions) -> str:
    voices = RELATION_VOICES[relation.name]
    voice = voices[style.voices[index] % len(voices)]
    phrase = voice.phrases[style.relation_words[index] % len(voice.phrases)]
    first, second = relation.subject, relation.reference
    if voice.reference_first:
        first, second = second, first
    first_phrase, plural = mentions(first)
    second_phrase, _ = mentions(second)
    if voice.is_verb:
        return f"{first_phrase} {plural_verb(phrase) if plural else phrase} {second_phrase}"
    return f"{first_phrase} {'are' if plural else 'is'} {phrase} {second_phrase}"


def _existence_clause(group: Group, style: Style, mentions: _Mentions, first: bool) -> str:
    template = EXISTENCE_TEMPLATES[style.existence_template % len(EXISTENCE_TEMPLATES)]
    noun, plural = mentions(group.ref)
    return template.format(noun=noun, be="are" if plural else "is", also="" if first else "also ")


def view(scene: Scene, style: Style, kind: str, rng: random.Random) -> Style:
    """``style`` with only the surface choices of one view kind re-drawn (meaning is untouched).

    Re-draws up to ``VIEW_ATTEMPTS`` times until the sentence changes; the last draw is kept when the
    kind cannot change this scene's sentence (e.g. shuffling a single clause).
    """
    if kind not in VIEW_KINDS:
        raise ValueError(f"kind must be one of {VIEW_KINDS}, got {kind!r}")
    original = realize(scene, style)
    for _ in range(VIEW_ATTEMPTS):
        fresh = random_style(rng)
        candidate = replace(style, **{name: getattr(fresh, name) for name in VIEW_FIELDS[kind]})
        if realize(scene, candidate) != original:
            break
    return candidate


def counterfactual_sentence(scene: Scene, style: Style, kind: str, rng: random.Random) -> str:
    """A counterfactual of ``scene`` (see ``counterfactual``) realized as a minimal pair with
    ``realize(scene, style)``: each group and clause keeps the surface choices of its counterpart, so
    the sentence changes only where the edit forces it, which makes it a hard negative.
    """
    edited = counterfactual(scene, kind, rng)
    return realize(edited, _carry_style(scene, edited, style))


def _carry_style(scene: Scene, edited: Scene, style: Style) -> Style:
    """``style`` re-indexed from ``scene``'s groups and clauses to their counterparts in ``edited``.

    Needed because canonical sorting can move an edited group or relation to another position.
    """
    group_sources = _counterparts(scene.groups, edited.groups)
    renamed = {scene.groups[source].ref: group.ref for source, group in zip(group_sources, edited.groups)}
    old_clauses = [_rename(clause, renamed) for clause in _clauses(scene)]
    clause_sources = _counterparts(old_clauses, _clauses(edited))
    relation_sources = clause_sources[: len(edited.relations)]
    targets = {source: target for target, source in enumerate(clause_sources)}
    order = [targets[index] for index in style.clause_order if index in targets]
    return replace(
        style,
        clause_order=tuple(order + [index for index in range(MAX_CLAUSES) if index not in order]),
        voices=_reorder(style.voices, relation_sources),
        relation_words=_reorder(style.relation_words, relation_sources),
        number_words=_reorder(style.number_words, group_sources),
        shape_words=_reorder(style.shape_words, group_sources),
    )


def _counterparts(old: Sequence[T], new: Sequence[T]) -> list[int]:
    """For each item of ``new``, the index of its counterpart in ``old``.

    Unchanged items pair with their equal; the items an edit changed pair up in order. An edit never
    adds items, so the unmatched old items always suffice.
    """
    sources = [old.index(item) if item in old else None for item in new]
    unmatched = iter([index for index in range(len(old)) if index not in sources])
    return [next(unmatched) if source is None else source for source in sources]


def _rename(clause: Relation | Group, renamed: dict[Ref, Ref]) -> Relation | Group:
    if isinstance(clause, Relation):
        return Relation(clause.name, renamed[clause.subject], renamed[clause.reference])
    return Group(*renamed[clause.ref], clause.count)


def _reorder(choices: tuple[int, ...], sources: list[int]) -> tuple[int, ...]:
    """Choices for the new items from their sources; slots past the scene's items are kept."""
    return tuple(choices[source] for source in sources) + choices[len(sources) :]


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A realization with every surface choice re-drawn."""
    return realize(scene, random_style(rng))


def distinct_realizations(scene: Scene, num: int, rng: random.Random) -> list[tuple[str, Style]]:
    """``num`` paraphrases of ``scene`` that differ from each other, each with its style.

    Identical strings would make a positive pair or a retrieval trivially right.
    """
    if not 1 <= num <= MAX_DISTINCT_SENTENCES:
        raise ValueError(f"num must be in [1, {MAX_DISTINCT_SENTENCES}], got {num}")
    found: dict[str, Style] = {}
    while len(found) < num:
        style = random_style(rng)
        found.setdefault(realize(scene, style), style)
    return list(found.items())


def training_examples(
    num_scenes: int, seed: int, views_per_scene: int, counterfactuals_per_scene: int,
    kinds: Sequence[str] = COUNTERFACTUAL_KINDS,
) -> list[dict[str, list[str]]]:
    """Distinct paraphrase views and counterfactual sentences for ``num_scenes`` train-split scenes.

    Spec 004 P2: views are positives for InfoNCE, counterfactuals its constructed negatives.
    Counterfactual ``i`` is a minimal pair with view ``i % views_per_scene`` (see
    ``counterfactual_sentence``), so an anchor view can be paired with a negative worded like itself:
    the hardest negative, telling meaning apart from wording. Kinds cycle from a random start, one
    step per round over the views, so ``len(kinds) * views_per_scene`` counterfactuals give every view
    one negative of each of ``kinds`` (names of ``text.blocks.scenes.EDIT_KINDS``).
    """
    if not 1 <= views_per_scene <= MAX_DISTINCT_SENTENCES:
        raise ValueError(f"views_per_scene must be in [1, {MAX_DISTINCT_SENTENCES}], got {views_per_scene}")
    check_edit_kinds(kinds)
    rng = random.Random(seed)
    num_kinds = len(kinds)
    examples = []
    for scene in distinct_scenes(num_scenes, rng, "train"):
        views = distinct_realizations(scene, views_per_scene, rng)
        start = rng.randrange(num_kinds)
        num_views = len(views)
        scene_kinds = [kinds[(start + i // num_views) % num_kinds] for i in range(counterfactuals_per_scene)]
        negatives = [counterfactual_sentence(scene, views[i % len(views)][1], kind, rng)
                     for i, kind in enumerate(scene_kinds)]
        examples.append({"views": [sentence for sentence, _ in views], "counterfactuals": negatives})
    return examples

