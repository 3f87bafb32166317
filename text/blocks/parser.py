"""Rule-based parser from sentences back to scene graphs (spec 004 P5 "Automatic Checker").

Regular expressions over the realizer's own vocabulary, so every realization parses back to its
scene; anything else raises a ValueError quoting the sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from text.blocks.scenes import COLORS, Group, Ref, Relation, Scene
from text.blocks.sentences import CONNECTIVES, NUMBER_WORDS, RELATION_VOICES, SHAPE_NAMES, plural_verb

_COUNTS = {word: count for count, words in NUMBER_WORDS.items() for word in words} | {"an": 1}
# Singular and plural surface name -> canonical shape.
_SHAPES = {
    form: shape for shape, names in SHAPE_NAMES.items() for name in names for form in (name, name + "s")
}


def _relation_phrases(is_verb: bool) -> dict[str, tuple[str, bool]]:
    """Surface phrase -> (canonical relation, whether the reference is named first)."""
    return {
        form: (name, voice.reference_first)
        for name, voices in RELATION_VOICES.items()
        for voice in voices
        if voice.is_verb == is_verb
        for phrase in voice.phrases
        for form in ((phrase, plural_verb(phrase)) if is_verb else (phrase,))
    }


_COPULA_PHRASES = _relation_phrases(is_verb=False)
_VERB_PHRASES = _relation_phrases(is_verb=True)
_PHRASES = _COPULA_PHRASES | _VERB_PHRASES


def _alternatives(words: Iterable[str]) -> str:
    """A regex alternation that tries longer words first ("a pair of" before "a")."""
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _noun_phrase(tag: str) -> str:
    return (
        rf"(?P<{tag}_number>the|{_alternatives(_COUNTS)}) "
        rf"(?P<{tag}_color>{_alternatives(COLORS)}) (?P<{tag}_shape>{_alternatives(_SHAPES)})"
    )


_BE = "(?:is|are)"
_CONNECTIVE = re.compile(_alternatives(CONNECTIVES))
_FIRST, _SECOND = _noun_phrase("first"), _noun_phrase("second")
_CLAUSES = (
    re.compile(rf"{_FIRST} {_BE} (?P<phrase>{_alternatives(_COPULA_PHRASES)}) {_SECOND}"),
    re.compile(rf"{_FIRST} (?P<phrase>{_alternatives(_VERB_PHRASES)}) {_SECOND}"),
    re.compile(rf"there {_BE}(?: also)? {_FIRST}"),
    re.compile(rf"{_FIRST} {_BE}(?: also)? present"),
)


@dataclass(frozen=True)
class _Mention:
    """A noun phrase; ``count`` is None for a definite reference ("the red cubes")."""

    ref: Ref
    count: int | None


def parse(sentence: str) -> Scene:
    """The scene graph a sentence describes; ValueError quoting the sentence when it cannot be read."""
    try:
        return _parse(sentence)
    except ValueError as error:
        raise ValueError(f"cannot parse sentence {sentence!r}: {error}") from error


def _parse(sentence: str) -> Scene:
    # Detokenized text may put spaces before punctuation ("ball ."); the rules expect none.
    text = " ".join(re.sub(r"\s+([,.])", r"\1", sentence.lower()).split()).removesuffix(".")
    mentions: list[_Mention] = []
    relations = []
    for clause in _CONNECTIVE.split(text):
        match = next((found for pattern in _CLAUSES if (found := pattern.fullmatch(clause))), None)
        if match is None:
            raise ValueError(f"the clause {clause!r} matches no known pattern")
        parts = match.groupdict()
        clause_mentions = [_mention(parts, tag) for tag in ("first", "second") if parts.get(f"{tag}_color")]
        mentions += clause_mentions
        if parts.get("phrase"):
            name, reference_first = _PHRASES[parts["phrase"]]
            subject, reference = (mention.ref for mention in clause_mentions)
            if reference_first:
                subject, reference = reference, subject
            relations.append(Relation(name, subject, reference))
    return Scene(_groups(mentions), tuple(relations))


def _mention(parts: dict[str, str | None], tag: str) -> _Mention:
    number = parts[f"{tag}_number"]
    ref = (parts[f"{tag}_color"], _SHAPES[parts[f"{tag}_shape"]])
    return _Mention(ref, None if number == "the" else _COUNTS[number])


def _groups(mentions: list[_Mention]) -> tuple[Group, ...]:
    """One group per (color, shape), counted by its indefinite mentions."""
    counts: dict[Ref, int] = {}
    for mention in mentions:
        if mention.count is None:
            continue
        if counts.setdefault(mention.ref, mention.count) != mention.count:
            raise ValueError(f"{mention.ref} is counted both {counts[mention.ref]} and {mention.count}")
    for mention in mentions:
        if mention.ref not in counts:
            raise ValueError(f"{mention.ref} is only referred to with 'the', never introduced with a count")
    return tuple(Group(color, shape, count) for (color, shape), count in counts.items())
