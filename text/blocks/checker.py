"""Spec 004 P5's "Automatic Checker (rule-based)": how much of a sentence's scene graph a generated sentence
states, by the rule-based parser (``text.blocks.parser``).

Graph F1 compares sets of facts. A group is one fact, ``(color, shape, count)``; a relation is another,
``(name, subject, reference)`` in its canonical form (``text.blocks.scenes.Relation``), so "the ball is
under the cube" and "the cube is on the ball" state the same fact, while swapping the arguments states a
different one. A sentence the parser cannot read states nothing: it scores 0 and is counted as unread.
"""

from __future__ import annotations

from dataclasses import dataclass

from text.blocks.parser import parse
from text.blocks.scenes import Scene

Fact = tuple


def graph_facts(scene: Scene) -> frozenset[Fact]:
    """The scene's groups ``("group", color, shape, count)`` and relations ``("relation", name, subject...,
    reference...)``."""
    return frozenset({("group", *group.key()) for group in scene.groups}
                     | {("relation", *relation.key()) for relation in scene.relations})


def fact_f1(reference: frozenset[Fact], candidate: frozenset[Fact]) -> float:
    """``2 |R & C| / (|R| + |C|)``, the F1 of precision ``|R & C| / |C|`` and recall ``|R & C| / |R|``."""
    if not reference and not candidate:
        return 1.0
    return 2 * len(reference & candidate) / (len(reference) + len(candidate))


@dataclass(frozen=True)
class GraphCheck:
    """One generated sentence against its source's scene: Graph F1, and whether the parser read it."""

    f1: float
    parsed: bool


def check_graph(reference: Scene, generated: str) -> GraphCheck:
    """Graph F1 of ``generated`` against the ``reference`` scene; 0 when the parser cannot read it."""
    try:
        candidate = parse(generated)
    except ValueError:
        return GraphCheck(0.0, parsed=False)
    return GraphCheck(fact_f1(graph_facts(reference), graph_facts(candidate)), parsed=True)
