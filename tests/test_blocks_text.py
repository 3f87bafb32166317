"""The text datamodule: tokenizer, view pairs, determinism, evaluation batches."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from tokenizers import Tokenizer

from datamodules.blocks_text import BlocksTextDataModule, view_pair_draw
from text.tokenizer import BOS_ID, EOS_ID, PAD_ID, decode, encode, train_bpe, trim_padding

SMALL_DATA = {"num_train_scenes": 120, "views_per_scene": 4, "counterfactuals_per_scene": 16,
              "counterfactuals_per_anchor": 2, "vocab_size": 512,
              "batch_size": 16, "eval_batch_size": 8, "eval_items": 12}


@pytest.fixture(scope="module")
def datamodule() -> BlocksTextDataModule:
    data = BlocksTextDataModule(**SMALL_DATA)
    data.setup("fit")
    return data


def test_bpe_round_trip_and_length_error():
    tokenizer = train_bpe(["two red cubes are on a blue ball."] * 20, vocab_size=300)
    ids = encode(tokenizer, ["two red cubes are on a blue ball."], max_length=16)
    real = ids[0][ids[0] != PAD_ID].tolist()
    assert tokenizer.decode(real).strip() == "two red cubes are on a blue ball."
    with pytest.raises(ValueError, match="more than max_length=3"):
        encode(tokenizer, ["two red cubes are on a blue ball."], max_length=3)
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["a"], vocab_size=100)


def test_bos_eos_frame_the_sentence_only_when_asked():
    sentences = ["two red cubes are on a blue ball.", "a red cube."]
    tokenizer = train_bpe(sentences * 20, vocab_size=300)
    plain = encode(tokenizer, sentences, max_length=16)
    framed = encode(tokenizer, sentences, max_length=16, add_bos_eos=True)
    for row, sentence in enumerate(sentences):
        tokens = tokenizer.encode(sentence).ids
        assert plain[row].tolist() == tokens + [PAD_ID] * (16 - len(tokens))  # the encoder's ids, unchanged
        assert framed[row].tolist() == [BOS_ID, *tokens, EOS_ID] + [PAD_ID] * (14 - len(tokens))
    assert decode(tokenizer, framed) == decode(tokenizer, plain) == sentences
    generated = framed.clone()
    generated[1, framed[1].tolist().index(EOS_ID) + 1:] = plain[0, 1]  # what a decoder writes after EOS
    assert decode(tokenizer, generated)[1] == sentences[1]
    exact = len(tokenizer.encode(sentences[0]).ids)  # fits without the specials, not with them
    assert encode(tokenizer, sentences[:1], max_length=exact).shape == (1, exact)
    with pytest.raises(ValueError, match=f"has {exact + 2} tokens, more than max_length={exact}"):
        encode(tokenizer, sentences[:1], max_length=exact, add_bos_eos=True)
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        encode(tokenizer, ["a red cube.", ""], max_length=16, add_bos_eos=True)


def test_trim_padding_keeps_the_longest_row():
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0]])
    assert trim_padding(ids).tolist() == [[5, 6, 0], [7, 8, 9]]


def test_view_pairs_are_distinct_views_and_negatives_worded_like_the_anchor():
    draw = view_pair_draw(num_views=3, num_counterfactuals=12, per_anchor=2)(torch.Generator().manual_seed(0), 500)
    assert (draw["view_a"] != draw["view_b"]).all()
    assert draw["counterfactual"].shape == (500, 2)
    assert (draw["counterfactual"] % 3 == draw["view_a"][:, None]).all()
    assert (draw["counterfactual"][:, 0] != draw["counterfactual"][:, 1]).all()
    assert set(draw["view_b"].tolist()) == {0, 1, 2} and set(draw["counterfactual"].flatten().tolist()) == set(range(12))
    with pytest.raises(ValueError, match="views_per_scene=1"):
        view_pair_draw(1, 2)
    with pytest.raises(ValueError, match="counterfactuals_per_scene=4 must be a positive multiple"):
        view_pair_draw(3, 4)
    with pytest.raises(ValueError, match="counterfactuals_per_anchor=5 must lie in \\[1, 4\\]"):
        view_pair_draw(3, 12, per_anchor=5)


def test_counterfactual_kinds_default_to_the_spec_s_and_are_checked():
    assert BlocksTextDataModule().hparams.counterfactual_kinds == ("color", "relation", "count", "swap_arguments")
    with pytest.raises(ValueError, match="data.counterfactual_kinds must be a non-empty subset .*got \\['colour'\\]"):
        BlocksTextDataModule(counterfactual_kinds=("colour",))


def test_training_batches_hold_token_ids_of_the_drawn_views(datamodule):
    batch = next(iter(datamodule.train_dataloader()))
    drawn = {key: batch[key].clone() for key in ("index", "view_a", "view_b", "counterfactual")}
    batch = datamodule.on_after_batch_transfer(batch, 0)
    views = datamodule._tensors["train_views"]
    for row in range(len(drawn["index"])):
        expected = views[drawn["index"][row], drawn["view_a"][row]]
        got = batch["view_a"][row]
        assert torch.equal(got, expected[: len(got)]) and (expected[len(got):] == PAD_ID).all()
    assert not torch.equal(batch["view_a"][:, :5], batch["view_b"][:, :5])  # different wordings
    negatives = datamodule._tensors["train_counterfactuals"][drawn["index"][0], drawn["counterfactual"][0]]
    assert batch["counterfactual"].shape[:2] == (len(drawn["index"]), 2)
    assert torch.equal(batch["counterfactual"][0], negatives[:, : batch["counterfactual"].shape[-1]])


def test_batches_are_cut_to_their_longest_sentence_on_the_host(datamodule):
    """The widths read on the host give the batches trim_padding gave on the device, in training and evaluation."""
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch["width"]) == {"view_a", "view_b", "counterfactual"}
    index = batch["index"]
    views, counterfactuals = datamodule._tensors["train_views"], datamodule._tensors["train_counterfactuals"]
    expected = {"view_a": trim_padding(views[index, batch["view_a"]]),
                "view_b": trim_padding(views[index, batch["view_b"]]),
                "counterfactual": trim_padding(counterfactuals[index[:, None], batch["counterfactual"]])}
    batch = datamodule.on_after_batch_transfer(batch, 0)
    assert "width" not in batch
    for key, ids in expected.items():
        assert torch.equal(batch[key], ids), key
    assert datamodule.STAGE_SPLITS[RunningStage.VALIDATING] == "val"
    batch = datamodule.gather(next(iter(datamodule.val_dataloader())), "val")
    for key in ("sentence", "paraphrases", "counterfactuals"):
        assert torch.equal(batch[key], trim_padding(datamodule._tensors[f"val_{key}"][:8])), key
    assert torch.equal(batch["counterfactual_kind"], datamodule._tensors["val_counterfactual_kind"][:8])


def test_epochs_are_reproducible_and_differ(datamodule):
    loader = datamodule.train_dataloader()
    first = [batch["view_a"] for batch in loader]
    again = [batch["view_a"] for batch in loader]
    loader.sampler.set_epoch(1)
    second = [batch["view_a"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_evaluation_items_come_from_the_pack(datamodule):
    pack = datamodule.eval_pack["val"]
    assert datamodule._tensors["val_paraphrases"].shape[:2] == (12, len(pack[0]["paraphrases"]))
    ids = datamodule._tensors["val_sentence"][0]
    assert datamodule.tokenizer.decode(ids[ids != PAD_ID].tolist()).strip() == pack[0]["sentence"]
    assert datamodule.montage_sentences[0] == pack[0]["sentence"] and len(datamodule.montage_sentences) == 16


def test_the_checkpoint_tokenizer_wins(datamodule, tmp_path):
    other = BlocksTextDataModule(**(SMALL_DATA | {"vocab_size": 400}))
    other.setup("fit")
    assert other.tokenizer.to_str() != datamodule.tokenizer.to_str()
    other.load_state_dict(datamodule.state_dict())
    assert other.tokenizer.to_str() == datamodule.tokenizer.to_str()
    assert torch.equal(other._tensors["val_sentence"], datamodule._tensors["val_sentence"])
    path = tmp_path / "tokenizer.json"
    datamodule.tokenizer.save(str(path))
    from_file = BlocksTextDataModule(**(SMALL_DATA | {"tokenizer_file": str(path)}))
    assert from_file.tokenizer.to_str() == Tokenizer.from_file(str(path)).to_str()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        BlocksTextDataModule(**(SMALL_DATA | {"tokenizer_file": str(tmp_path / "missing.json")})).tokenizer


def test_training_items_are_read_once_in_order_with_their_views(datamodule):
    batches = [datamodule.gather(batch, "train") for batch in datamodule.training_items_dataloader()]
    indices = torch.cat([batch["index"] for batch in batches])
    assert torch.equal(indices, torch.arange(datamodule.num_train_items))
    assert all(batch["view_a"].shape[0] == len(batch["index"]) for batch in batches)
