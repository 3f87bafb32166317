"""Blocks-world corpus: canonical scenes, disjoint splits, views that keep meaning, counterfactuals
that break it, the parser that tells them apart, and the shipped evaluation pack."""

from __future__ import annotations

import random
import re
import time
from dataclasses import fields

import pytest

from text.blocks import (
    COLORS,
    COUNTERFACTUAL_KINDS,
    EDIT_KINDS,
    SHAPES,
    SPLITS,
    VIEW_KINDS,
    Group,
    Relation,
    Scene,
    Style,
    build_eval_pack,
    counterfactual,
    counterfactual_sentence,
    load_eval_pack,
    paraphrase,
    parse,
    random_style,
    realize,
    sample_scene,
    sample_scenes,
    scene_split,
    training_examples,
    view,
)
from text.blocks.sentences import VIEW_FIELDS, distinct_realizations

RED_CUBES, BLUE_BALL = Group("red", "cube", 2), Group("blue", "ball", 1)
CUBES_ON_BALL = Scene((RED_CUBES, BLUE_BALL), (Relation("on", RED_CUBES.ref, BLUE_BALL.ref),))


def plain_style(**choices: object) -> Style:
    """Every choice 0 unless given: the first entry of each vocabulary list."""
    defaults = dict(
        clause_order=(0, 1), voices=(0, 0), relation_words=(0, 0), connective=0, existence_template=0,
        number_words=(0, 0, 0), shape_words=(0, 0, 0),
    )
    return Style(**(defaults | choices))


def scenes(num: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(num)]


def edit_kind(old: Scene, new: Scene) -> str:
    """Which counterfactual kind turns ``old`` into ``new``, read off the two graphs."""
    if [group.ref for group in old.groups] != [group.ref for group in new.groups]:
        return "color" if {g.color for g in old.groups} != {g.color for g in new.groups} else "shape"
    if old.groups != new.groups:
        return "count"
    (removed,), (added,) = set(old.relations) - set(new.relations), set(new.relations) - set(old.relations)
    return "relation" if added.name != removed.name else "swap_arguments"


# Realization, by hand.


@pytest.mark.parametrize(
    ("choices", "sentence"),
    [
        ({}, "two red cubes are on a blue ball."),
        ({"relation_words": (1, 0)}, "two red cubes are on top of a blue ball."),
        ({"voices": (1, 0), "relation_words": (2, 0)}, "a blue ball is below two red cubes."),
        ({"voices": (3, 0), "relation_words": (1, 0)}, "a blue ball holds up two red cubes."),
        ({"voices": (2, 0)}, "two red cubes are supported by a blue ball."),
        # Groups are sorted (blue ball first), so per-group choices read (ball, cube).
        (
            {"number_words": (2, 2, 0), "shape_words": (1, 1, 0)},
            "a pair of red blocks are on a single blue sphere.",
        ),
        ({"number_words": (1, 1, 0)}, "2 red cubes are on one blue ball."),
        # Indices wrap around each list: voice 6 of the four "on" voices is voice 2.
        ({"voices": (6, 0)}, "two red cubes are supported by a blue ball."),
    ],
)
def test_realize_by_hand(choices, sentence):
    assert realize(CUBES_ON_BALL, plain_style(**choices)) == sentence


def test_realize_existence_clause_connective_and_article_by_hand():
    ring, cubes, planks = Group("orange", "ring", 1), Group("red", "cube", 3), Group("white", "plank", 2)
    scene = Scene((cubes, planks, ring), (Relation("left_of", cubes.ref, planks.ref),))
    shuffled = plain_style(clause_order=(1, 0), voices=(1, 0), connective=1)
    expected = "there is an orange ring, while two white planks are right of three red cubes."
    assert realize(scene, shuffled) == expected
    present = plain_style(existence_template=1, connective=2)
    expected = "three red cubes are left of two white planks and an orange ring is also present."
    assert realize(scene, present) == expected


def test_later_mentions_are_definite_and_agree_in_number():
    ball, cubes, tubes = Group("blue", "ball", 1), Group("red", "cube", 2), Group("green", "cylinder", 3)
    relations = (Relation("on", cubes.ref, ball.ref), Relation("in_front_of", tubes.ref, cubes.ref))
    scene = Scene((ball, cubes, tubes), relations)
    # Relations sort as (in_front_of, on); the tubes "block" (verb voice, plural agreement) the cubes.
    style = plain_style(voices=(2, 0), relation_words=(1, 0), shape_words=(0, 1, 1))
    expected = "three green tubes block two red blocks, and the red blocks are on a blue ball."
    assert realize(scene, style) == expected


# Scenes: canonical storage and validation.


@pytest.mark.parametrize(
    ("inverse", "canonical"), [("under", "on"), ("right_of", "left_of"), ("behind", "in_front_of")]
)
def test_inverse_relations_are_stored_canonically(inverse, canonical):
    a, b = ("red", "cube"), ("blue", "ball")
    assert Relation(inverse, a, b) == Relation(canonical, b, a)
    assert Relation(inverse, a, b).key() == (canonical, "blue", "ball", "red", "cube")
    groups = (Group("red", "cube", 1), Group("blue", "ball", 2))
    assert Scene(groups, (Relation(inverse, a, b),)) == Scene(groups[::-1], (Relation(canonical, b, a),))


def test_scene_is_canonical_and_round_trips_through_json():
    reordered = Scene((BLUE_BALL, RED_CUBES), (Relation("under", BLUE_BALL.ref, RED_CUBES.ref),) * 2)
    assert reordered == CUBES_ON_BALL and hash(reordered) == hash(CUBES_ON_BALL)
    groups, relations = CUBES_ON_BALL.key()
    assert groups == (("blue", "ball", 1), ("red", "cube", 2))
    assert relations == (("on", "red", "cube", "blue", "ball"),)
    assert CUBES_ON_BALL.to_json() == {
        "groups": [["blue", "ball", 1], ["red", "cube", 2]],
        "relations": [["on", "red", "cube", "blue", "ball"]],
    }
    assert Scene.from_json(CUBES_ON_BALL.to_json()) == CUBES_ON_BALL


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Group("pink", "cube", 1), "color must be one of .* got 'pink'"),
        (lambda: Group("red", "pyramid", 1), "shape must be one of .* got 'pyramid'"),
        (lambda: Group("red", "cube", 4), "count must be one of \\(1, 2, 3\\), got 4"),
        (lambda: Relation("near", RED_CUBES.ref, BLUE_BALL.ref), "relation name must be .* got .near."),
        (lambda: Relation("on", RED_CUBES.ref, RED_CUBES.ref), "two different groups"),
        (lambda: Scene(()), "at least one group"),
        (lambda: Scene((RED_CUBES, Group("red", "cube", 1))), "only one group"),
        (lambda: Scene((RED_CUBES,), CUBES_ON_BALL.relations), "refers to \\('blue', 'ball'\\), not a group"),
    ],
)
def test_bad_scenes_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_sampled_scenes_have_the_promised_shape():
    for scene in scenes(300):
        assert len(scene.groups) in (2, 3)
        assert 1 <= len(scene.relations) <= len(scene.groups) - 1
        pairs = [frozenset((r.subject, r.reference)) for r in scene.relations]
        assert len(set(pairs)) == len(pairs)


# Reproducibility and splits.


def test_generation_is_reproducible_for_a_seed_and_differs_across_seeds():
    assert sample_scenes(30, seed=1, split="train") == sample_scenes(30, seed=1, split="train")
    assert sample_scenes(30, seed=1, split="train") != sample_scenes(30, seed=2, split="train")
    assert training_examples(20, 1, 3, 2) == training_examples(20, 1, 3, 2)
    assert training_examples(20, 1, 3, 2) != training_examples(20, 2, 3, 2)
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [paraphrase(CUBES_ON_BALL, rng_a) for _ in range(5)] == [
        paraphrase(CUBES_ON_BALL, rng_b) for _ in range(5)
    ]


def test_splits_share_no_scene_and_no_sentence():
    rng = random.Random(0)
    keys, sentences = {}, {}
    for split in SPLITS:
        split_scenes = sample_scenes(200, seed=3, split=split)
        assert len(set(split_scenes)) == 200
        assert all(scene_split(scene) == split for scene in split_scenes)
        keys[split] = {scene.key() for scene in split_scenes}
        sentences[split] = {paraphrase(scene, rng) for scene in split_scenes for _ in range(3)}
    for first, second in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not keys[first] & keys[second]
        assert not sentences[first] & sentences[second]


def test_split_sizes_are_about_80_10_10():
    drawn = [scene_split(scene) for scene in scenes(3000, seed=7)]
    fractions = {split: drawn.count(split) / len(drawn) for split in SPLITS}
    assert fractions["train"] == pytest.approx(0.8, abs=0.03)
    assert fractions["val"] == pytest.approx(0.1, abs=0.02)
    assert fractions["test"] == pytest.approx(0.1, abs=0.02)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of .* got 'dev'"):
        sample_scenes(3, seed=0, split="dev")


# Views keep the meaning.


def test_every_view_kind_parses_back_and_changes_only_its_own_choices():
    rng = random.Random(1)
    changed = dict.fromkeys(VIEW_KINDS, 0)
    sample = scenes(200, seed=1)
    for scene in sample:
        style = random_style(rng)
        sentence = realize(scene, style)
        assert parse(sentence) == scene
        assert parse(paraphrase(scene, rng)) == scene
        for kind in VIEW_KINDS:
            viewed = view(scene, style, kind, rng)
            for field in fields(Style):
                if field.name not in VIEW_FIELDS[kind]:
                    assert getattr(viewed, field.name) == getattr(style, field.name), (kind, field.name)
            viewed_sentence = realize(scene, viewed)
            assert parse(viewed_sentence) == scene, viewed_sentence
            changed[kind] += viewed_sentence != sentence
    # Shuffling needs two clauses (about half the scenes); every other kind can always change something.
    assert changed["conjunct_shuffle"] > 0.4 * len(sample)
    other_kinds = [kind for kind in VIEW_KINDS if kind != "conjunct_shuffle"]
    assert all(changed[kind] > 0.9 * len(sample) for kind in other_kinds), changed


def test_sentences_are_short_lower_case_and_end_with_a_period():
    rng = random.Random(2)
    for scene in scenes(300, seed=2):
        sentence = paraphrase(scene, rng)
        assert sentence == sentence.lower()
        assert sentence.endswith(".") and sentence.count(".") == 1
        assert len(sentence.split()) <= 35


def test_distinct_realizations_differ_and_match_their_styles():
    # One of the scenes with the fewest surface forms: two groups and a "left of" relation.
    scene = Scene((RED_CUBES, BLUE_BALL), (Relation("left_of", RED_CUBES.ref, BLUE_BALL.ref),))
    realizations = distinct_realizations(scene, 32, random.Random(0))
    assert len({sentence for sentence, _ in realizations}) == 32
    assert all(realize(scene, style) == sentence for sentence, style in realizations)
    with pytest.raises(ValueError, match="num must be in \\[1, 32\\], got 33"):
        distinct_realizations(scene, 33, random.Random(0))


def test_unknown_view_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of .* got 'tense'"):
        view(CUBES_ON_BALL, plain_style(), "tense", random.Random(0))


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ({"clause_order": (0, 0)}, "clause_order must permute range\\(2\\)"),
        ({"voices": (0,)}, "voices needs 2 choices"),
        ({"number_words": (0, -1, 0)}, "must be non-negative"),
    ],
)
def test_bad_styles_are_refused(choices, message):
    with pytest.raises(ValueError, match=message):
        plain_style(**choices)


def test_scenes_beyond_the_style_are_refused_by_realize():
    groups = tuple(Group(color, "cube", 1) for color in COLORS[:4])
    with pytest.raises(ValueError, match="at most 3 groups"):
        realize(Scene(groups), plain_style())


# Counterfactuals break it.


def test_every_counterfactual_kind_changes_the_graph_as_named():
    assert EDIT_KINDS[: len(COUNTERFACTUAL_KINDS)] == COUNTERFACTUAL_KINDS == ("color", "relation", "count",
                                                                                "swap_arguments")
    for index, scene in enumerate(scenes(200, seed=3)):
        for kind in EDIT_KINDS:
            edited = counterfactual(scene, kind, random.Random(index))
            assert edited.key() != scene.key()
            assert edit_kind(scene, edited) == kind
            assert len(edited.groups) == len(scene.groups) and len(edited.relations) == len(scene.relations)
            if kind == "color":
                old_colors = {group.color for group in scene.groups}
                assert len({group.color for group in edited.groups} - old_colors) == 1
            if kind == "shape":  # one group's shape, its color and count kept
                changed = set(scene.groups) ^ set(edited.groups)
                (old,), (new,) = changed & set(scene.groups), changed & set(edited.groups)
                assert (old.color, old.count) == (new.color, new.count) and old.shape != new.shape


def test_a_shape_flip_by_hand_renames_the_group_in_its_relations():
    edited = counterfactual(CUBES_ON_BALL, "shape", random.Random(0))
    (cubes,) = [group for group in edited.groups if group.color == "red"]
    assert edited == Scene((cubes, Group("blue", "ball", 1)), (Relation("on", cubes.ref, ("blue", "ball")),))
    assert cubes.shape != "cube" and cubes.count == 2


def test_counterfactual_sentences_parse_to_the_counterfactual_scene():
    rng = random.Random(4)
    for index, scene in enumerate(scenes(200, seed=4)):
        style = random_style(rng)
        for kind in EDIT_KINDS:
            sentence = counterfactual_sentence(scene, style, kind, random.Random(index))
            assert parse(sentence) == counterfactual(scene, kind, random.Random(index))


def test_counterfactual_sentences_are_minimal_pairs():
    # Swapping the only relation's arguments keeps the voice, words and number words of each group.
    style = plain_style(relation_words=(1, 0))
    swapped = counterfactual_sentence(CUBES_ON_BALL, style, "swap_arguments", random.Random(0))
    assert (realize(CUBES_ON_BALL, style), swapped) == (
        "two red cubes are on top of a blue ball.",
        "a blue ball is on top of two red cubes.",
    )
    rng = random.Random(5)
    for index, scene in enumerate(scenes(200, seed=5)):
        style = random_style(rng)
        words = realize(scene, style).split()
        recolored = counterfactual_sentence(scene, style, "color", random.Random(index)).split()
        assert len(recolored) == len(words)
        differences = {(a, b) for a, b in zip(words, recolored) if a != b}
        assert differences, words
        # Only color words change, and the article before one ("a red" -> "an orange").
        assert all(a in COLORS or a in ("a", "an") for a, _ in differences), differences


def test_counterfactuals_that_cannot_exist_are_refused():
    lonely = Scene((RED_CUBES, BLUE_BALL))
    with pytest.raises(ValueError, match="has no relation, so no 'swap_arguments' counterfactual"):
        counterfactual(lonely, "swap_arguments", random.Random(0))
    rainbow = Scene(tuple(Group(color, "ring", 1) for color in COLORS))
    with pytest.raises(ValueError, match="uses every color"):
        counterfactual(rainbow, "color", random.Random(0))
    every_red = Scene(tuple(Group("red", shape, 1) for shape in SHAPES))
    with pytest.raises(ValueError, match="names every shape in red"):
        counterfactual(every_red, "shape", random.Random(0))
    with pytest.raises(ValueError, match="kind must be one of .* got 'size'"):
        counterfactual(CUBES_ON_BALL, "size", random.Random(0))


# The parser.


@pytest.mark.parametrize(
    ("sentence", "groups", "relations"),
    [
        (
            "2 orange hoops are hidden by a single white board.",
            [("orange", "ring", 2), ("white", "plank", 1)],
            [("in_front_of", "white", "plank", "orange", "ring")],
        ),
        (
            "Three red cubes hold up an orange ball.",
            [("orange", "ball", 1), ("red", "cube", 3)],
            [("on", "orange", "ball", "red", "cube")],
        ),
        (
            "a pair of green tubes are to the right of one black sphere, while there is also a trio of blue"
            " rings.",
            [("black", "ball", 1), ("blue", "ring", 3), ("green", "cylinder", 2)],
            [("left_of", "black", "ball", "green", "cylinder")],
        ),
    ],
)
def test_parse_by_hand(sentence, groups, relations):
    expected = {"groups": [list(group) for group in groups], "relations": [list(r) for r in relations]}
    assert parse(sentence).to_json() == expected


def test_parse_tolerates_case_and_spacing():
    assert parse("  Two RED cubes are  on a blue ball , and there is also a white board .") == Scene(
        (RED_CUBES, BLUE_BALL, Group("white", "plank", 1)), CUBES_ON_BALL.relations
    )


def test_inverse_phrasings_parse_to_the_same_graph():
    assert parse("a red cube is under a blue ball.") == parse("a blue ball is on a red cube.")
    assert parse("a red cube is under a blue ball.") == parse("a blue ball is held up by a red cube.")


@pytest.mark.parametrize(
    ("sentence", "reason"),
    [
        ("the quick brown fox jumps over the lazy dog.", "matches no known pattern"),
        ("", "matches no known pattern"),
        ("two red cubes are near a blue ball.", "matches no known pattern"),
        ("a red cube is on the blue ball.", "only referred to with 'the'"),
        ("two red cubes are on a blue ball, and a red cube is behind the blue ball.", "counted both 2 and 1"),
        ("a red cube is on the red cube.", "two different groups"),
    ],
)
def test_parser_rejects_what_it_cannot_read_and_quotes_it(sentence, reason):
    with pytest.raises(ValueError, match=f"cannot parse sentence {re.escape(repr(sentence))}: .*{reason}"):
        parse(sentence)


# The evaluation pack and training examples.


def test_shipped_eval_pack_is_the_built_one():
    # The shipped file was written by another process, so equality also shows that split assignment
    # does not depend on Python's per-process string hashing.
    assert load_eval_pack() == build_eval_pack()


def test_eval_pack_items_keep_and_break_meaning_as_labelled():
    pack = load_eval_pack()
    assert (pack["version"], pack["seed"], len(pack["val"]), len(pack["test"])) == (1, 0, 256, 256)
    assert pack["montage"] == [item["sentence"] for item in pack["val"][:16]]
    assert len(set(pack["montage"])) == 16
    for split in ("val", "test"):
        for item in pack[split]:
            graph = Scene.from_json(item["graph"])
            assert scene_split(graph) == split
            assert parse(item["sentence"]) == graph
            assert len(set(item["paraphrases"]) | {item["sentence"]}) == 5
            assert all(parse(sentence) == graph for sentence in item["paraphrases"])
            assert item["counterfactual_kinds"] == list(COUNTERFACTUAL_KINDS)
            for kind, sentence in zip(item["counterfactual_kinds"], item["counterfactuals"], strict=True):
                assert edit_kind(graph, parse(sentence)) == kind


def test_eval_pack_arguments_are_checked():
    with pytest.raises(ValueError, match="size must be at least 16"):
        build_eval_pack(size=8)
    with pytest.raises(ValueError, match="paraphrases must be in \\[1, 31\\], got 0"):
        build_eval_pack(paraphrases=0)


def test_training_examples_are_train_views_and_counterfactuals_of_every_kind():
    examples = training_examples(40, seed=0, views_per_scene=3, counterfactuals_per_scene=12)
    assert len(examples) == 40
    graphs = []
    for example in examples:
        assert len(set(example["views"])) == 3 and len(example["counterfactuals"]) == 12
        graph = parse(example["views"][0])
        assert scene_split(graph) == "train"
        assert all(parse(sentence) == graph for sentence in example["views"])
        kinds = [edit_kind(graph, parse(sentence)) for sentence in example["counterfactuals"]]
        # Counterfactual i pairs with view i % 3; each view gets one of each of the four kinds.
        for own_view in range(3):
            assert set(kinds[own_view::3]) == set(COUNTERFACTUAL_KINDS)
        for i, negative in enumerate(example["counterfactuals"]):  # a minimal pair with view i % 3
            assert len(set(example["views"][i % 3].split()) ^ set(negative.split())) <= 8
        graphs.append(graph)
    assert len(set(graphs)) == 40


def test_training_examples_are_fast_and_checked():
    start = time.perf_counter()
    training_examples(2000, seed=0, views_per_scene=6, counterfactuals_per_scene=2)
    assert time.perf_counter() - start < 5.0  # about half a second on one core
    with pytest.raises(ValueError, match="views_per_scene must be in \\[1, 32\\], got 0"):
        training_examples(1, seed=0, views_per_scene=0, counterfactuals_per_scene=1)
    with pytest.raises(ValueError, match="non-empty subset of .*got \\['colour'\\]"):
        training_examples(1, seed=0, views_per_scene=1, counterfactuals_per_scene=1, kinds=("colour",))


def test_training_examples_take_the_kinds_they_are_given():
    examples = training_examples(30, seed=0, views_per_scene=2, counterfactuals_per_scene=10, kinds=EDIT_KINDS)
    for example in examples:
        graph = parse(example["views"][0])
        kinds = [edit_kind(graph, parse(sentence)) for sentence in example["counterfactuals"]]
        for own_view in range(2):
            assert sorted(kinds[own_view::2]) == sorted(EDIT_KINDS)
    only_shapes = training_examples(5, seed=0, views_per_scene=2, counterfactuals_per_scene=2, kinds=("shape",))
    assert all(edit_kind(parse(e["views"][0]), parse(c)) == "shape" for e in only_shapes for c in e["counterfactuals"])
