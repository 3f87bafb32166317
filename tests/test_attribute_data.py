"""The attribute-embedding data of attribute transfer (spec 001, issue 11): the array and CelebA readers
and their errors, the training and fixed evaluation targets, and the block-world schema read back by the
rule-based parser."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from datamodules.attribute_embeddings import AttributeEmbeddingsDataModule
from datamodules.shape_scenes import ATTRIBUTE_NAMES as SHAPE_ATTRIBUTES
from datamodules.shape_scenes import default_embedder
from text.blocks.attributes import (
    DEFAULT_SCHEMA,
    attribute_vector,
    counterfactual,
    read_attributes,
    read_facts,
    sample_items,
)

BLOCK_SIZES = {"num_train": 40, "num_val": 40, "num_probe": 40, "num_test": 40}


@pytest.fixture(scope="module")
def text_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("text-cache"))


@pytest.fixture(scope="module")
def blocks(text_cache):
    return AttributeEmbeddingsDataModule(text_cache_dir=text_cache, batch_size=8, seed=3, **BLOCK_SIZES)


def write_arrays(folder, z, attributes):
    np.save(folder / "z.npy", z)
    np.save(folder / "a.npy", attributes)
    return str(folder / "z.npy"), str(folder / "a.npy")


def test_arrays_are_unit_rows_with_signs_converted_and_split_by_fraction(tmp_path):
    z = np.arange(1, 61, dtype=np.float32).reshape(20, 3)
    signs = np.where(np.arange(40).reshape(20, 2) % 3 == 0, 1, -1)
    embeddings, attributes = write_arrays(tmp_path, z, signs)
    data = AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes, seed=0)
    assert data.attribute_names == ["attr_0", "attr_1"]
    assert data.num_attributes == 2 and data.embedding_dim == 3
    rows = {split: data.split_tables(split) for split in ("train", "val", "probe", "test")}
    assert {split: len(tables["z"]) for split, tables in rows.items()} == {"train": 10, "val": 2, "probe": 4,
                                                                         "test": 4}
    everything = torch.cat([tables["z"] for tables in rows.values()])
    torch.testing.assert_close(everything.norm(dim=1), torch.ones(20))
    # every row appears once: its direction identifies it
    expected = torch.from_numpy(z) / torch.from_numpy(z).norm(dim=1, keepdim=True)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, expected.tolist()))
    first = torch.from_numpy(z[0]) / float(np.linalg.norm(z[0]))
    holder = next(tables for tables in rows.values() if (tables["z"] == first).all(1).any())
    assert holder["attributes"][(holder["z"] == first).all(1)].tolist() == [[1.0, 0.0]]  # signs (1, -1)
    assert not data.has_counterfactuals


@pytest.mark.parametrize(("attributes", "message"), [
    (np.array([[0, 1]] * 3 + [[0, 2]]), r"a\.npy: attributes must be binary .*row 3 is \[0, 2\]"),
    (np.array([[0, 1]] * 3), (r"a\.npy: attributes of shape \(3, 2\) do not match embeddings of shape "
                             r"\(4, 3\) in .*z\.npy")),
])
def test_bad_attributes_name_the_file_and_the_row_or_shape(tmp_path, attributes, message):
    embeddings, attribute_file = write_arrays(tmp_path, np.ones((4, 3), dtype=np.float32), attributes)
    with pytest.raises(ValueError, match=message):
        AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attribute_file).split_tables("train")


def test_nan_embedding_row_is_named(tmp_path):
    z = np.ones((4, 3), dtype=np.float32)
    z[2, 1] = np.nan
    embeddings, attributes = write_arrays(tmp_path, z, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"z\.npy: 1 rows hold NaN or inf \(first rows: \[2\]\)"):
        AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes).split_tables("train")


def test_partition_file_gives_splits_and_probe_is_cut_from_train(tmp_path):
    z = torch.eye(10) + 0.1
    embeddings, attributes = write_arrays(tmp_path, z.numpy(), np.eye(10, 2))
    np.save(tmp_path / "p.npy", np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 3]))
    data = AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes,
                                         partition=str(tmp_path / "p.npy"), attribute_names=["x", "y"])
    unit = z / z.norm(dim=1, keepdim=True)
    assert torch.equal(data.split_tables("val")["z"], unit[5:7])
    assert torch.equal(data.split_tables("probe")["z"], unit[9:])
    assert data.attribute_names == ["x", "y"]
    np.save(tmp_path / "p.npy", np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2]))
    data = AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes,
                                         partition=str(tmp_path / "p.npy"), probe_fraction=0.4)
    train, probe = data.split_tables("train")["z"], data.split_tables("probe")["z"]
    assert len(train) == 3 and len(probe) == 2
    assert sorted(map(tuple, torch.cat([train, probe]).tolist())) == sorted(map(tuple, unit[:5].tolist()))


CELEBA_NAMES = ["5_o_Clock_Shadow", "Eyeglasses", "Male", "Mustache", "Smiling", "Young"]


def write_celeba(folder, num_images=20):
    rng = np.random.default_rng(0)
    signs = rng.choice([-1, 1], size=(num_images, len(CELEBA_NAMES)))
    images = [f"{i + 1:06d}.jpg" for i in range(num_images)]
    lines = [str(num_images), " ".join(CELEBA_NAMES)]
    lines += [f"{image}  " + " ".join(f"{value:2d}" for value in row) for image, row in zip(images, signs)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    codes = [0] * 12 + [1] * 4 + [2] * 4
    (folder / "list_eval_partition.txt").write_text("".join(f"{i} {c}\n" for i, c in zip(images, codes)))
    z = rng.normal(size=(num_images, 4)).astype(np.float32)
    z[:, 0] = np.arange(num_images) + 1  # a row's direction names its image
    torch.save(torch.from_numpy(z), folder / "embeddings.pt")
    return signs, z


def test_celeba_reader_uses_names_official_partition_and_cuts_probe_from_train(tmp_path):
    signs, z = write_celeba(tmp_path)
    data = AttributeEmbeddingsDataModule(celeba_dir=str(tmp_path), embeddings=str(tmp_path / "embeddings.pt"),
                                         probe_fraction=0.25, seed=1)
    assert data.attribute_names == ["Smiling", "Young", "Male", "Eyeglasses", "Mustache"]
    unit = torch.from_numpy(z / np.linalg.norm(z, axis=1, keepdims=True))
    assert torch.allclose(data.split_tables("test")["z"], unit[16:])
    assert torch.allclose(data.split_tables("val")["z"], unit[12:16])
    columns = [CELEBA_NAMES.index(name) for name in data.attribute_names]
    expected = torch.from_numpy((signs[:, columns] + 1) / 2).float()
    assert torch.equal(data.split_tables("test")["attributes"], expected[16:])
    train, probe = data.split_tables("train"), data.split_tables("probe")
    assert len(train["z"]) == 9 and len(probe["z"]) == 3
    for tables in (train, probe):  # every row keeps its own image's attributes
        rows = [int(torch.isclose(unit, row).all(1).nonzero()) for row in tables["z"]]
        assert all(row < 12 for row in rows)
        assert torch.equal(tables["attributes"], expected[rows])


def test_celeba_image_list_beside_embeddings_picks_the_rows(tmp_path):
    signs, z = write_celeba(tmp_path)
    torch.save(torch.from_numpy(z[[17, 3]]), tmp_path / "embeddings.pt")
    (tmp_path / "files.txt").write_text("/images/000018.jpg\n/images/000004.jpg\n")
    data = AttributeEmbeddingsDataModule(celeba_dir=str(tmp_path), embeddings=str(tmp_path / "embeddings.pt"),
                                         celeba_attributes=["Male"])
    assert data.split_tables("test")["attributes"].tolist() == [[(signs[17, 2] + 1) / 2]]


@pytest.mark.parametrize(("edit", "message"), [
    ("attributes", r"list_attr_celeba\.txt: line 4 must be an image name and 6 values of -1 or 1"),
    ("partition", r"list_eval_partition\.txt: line 3 must be an image name and 0, 1 or 2"),
    ("names", r"list_attr_celeba\.txt: no attributes \['Smiling'\]; the known ones are \['5_o_Clock_Shadow'"),
])
def test_celeba_errors_name_file_and_line(tmp_path, edit, message):
    write_celeba(tmp_path)
    names = ["Smiling"]
    if edit == "attributes":
        path = tmp_path / "list_attr_celeba.txt"
        lines = path.read_text().splitlines()
        lines[3] = lines[3].replace("-1", "0", 1) if "-1" in lines[3] else lines[3] + " 1"
        path.write_text("\n".join(lines) + "\n")
    elif edit == "partition":
        path = tmp_path / "list_eval_partition.txt"
        lines = path.read_text().splitlines()
        lines[2] = "000003.jpg 7"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = tmp_path / "list_attr_celeba.txt"
        path.write_text(path.read_text().replace("Smiling", "Smile"))
    with pytest.raises(ValueError, match=message):
        AttributeEmbeddingsDataModule(celeba_dir=str(tmp_path), embeddings=str(tmp_path / "embeddings.pt"),
                                      celeba_attributes=names).split_tables("train")


def test_training_targets_flip_one_or_two_and_repeat_for_the_same_seed_and_epoch(tmp_path):
    embeddings, attributes = write_arrays(tmp_path, np.random.default_rng(0).normal(size=(200, 4)),
                                          np.random.default_rng(1).integers(0, 2, size=(200, 5)))

    def epoch_batches(epoch):
        data = AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes, batch_size=16,
                                             seed=5)
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [data.gather(batch, "train") for batch in loader], data

    batches, data = epoch_batches(1)
    assert set(batches[0]) == {"index", "z", "attributes", "target"}
    train = data.split_tables("train")
    for batch in batches:
        assert torch.equal(batch["attributes"], train["attributes"][batch["index"]])
        assert set((batch["target"] != batch["attributes"]).sum(1).tolist()) <= {1, 2}
    flips = torch.cat([(b["target"] != b["attributes"]).sum(1) for b in batches])
    assert set(flips.tolist()) == {1, 2}
    again, _ = epoch_batches(1)
    assert all(torch.equal(a["target"], b["target"]) and torch.equal(a["index"], b["index"])
               for a, b in zip(batches, again))
    other, _ = epoch_batches(2)
    assert not all(torch.equal(a["target"], b["target"]) for a, b in zip(batches, other))


def test_val_and_test_targets_are_fixed_flips(tmp_path):
    embeddings, attributes = write_arrays(tmp_path, np.random.default_rng(0).normal(size=(100, 4)),
                                          np.random.default_rng(1).integers(0, 2, size=(100, 5)))
    first, second = (AttributeEmbeddingsDataModule(embeddings=embeddings, attributes=attributes, seed=2)
                     for _ in range(2))
    for split in ("val", "test"):
        tables = first.split_tables(split)
        assert set(tables) == {"z", "attributes", "target"}
        assert set((tables["target"] != tables["attributes"]).sum(1).tolist()) <= {1, 2}
        assert torch.equal(tables["target"], second.split_tables(split)["target"])
        batch = first.gather({"index": torch.tensor([1, 0])}, split)
        assert torch.equal(batch["target"], tables["target"][[1, 0]])
    assert "target" not in first.split_tables("probe")


def test_block_world_parser_reads_every_item_and_counterfactual():
    items = sample_items(DEFAULT_SCHEMA, {"train": 40, "val": 40, "probe": 40, "test": 40}, seed=0)
    rng = random.Random(0)
    for split_items in items.values():
        for item in split_items:
            expected = attribute_vector(DEFAULT_SCHEMA, item.facts)
            assert read_attributes(DEFAULT_SCHEMA, item.sentence) == expected
            target = [rng.randint(0, 1) for _ in DEFAULT_SCHEMA.names]
            sentence = counterfactual(DEFAULT_SCHEMA, item, target)
            assert read_attributes(DEFAULT_SCHEMA, sentence) == target
            facts = read_facts(DEFAULT_SCHEMA, sentence)
            assert (facts.b_shape, facts.b_count) == (item.facts.b_shape, item.facts.b_count)
    scenes = {split: {item.scene for item in split_items} for split, split_items in items.items()}
    splits = list(scenes)
    assert all(scenes[a].isdisjoint(scenes[b]) for i, a in enumerate(splits) for b in splits[i + 1:])


def test_counterfactual_keeps_the_wording_of_a_hand_made_item():
    [item] = sample_items(DEFAULT_SCHEMA, {"train": 1}, seed=0)["train"]
    same = counterfactual(DEFAULT_SCHEMA, item, attribute_vector(DEFAULT_SCHEMA, item.facts))
    assert same == item.sentence
    flipped = attribute_vector(DEFAULT_SCHEMA, item.facts)
    flipped[0] = 1 - flipped[0]  # group A's color only: the sentence changes in that one word
    changed = counterfactual(DEFAULT_SCHEMA, item, flipped)
    differing = [(a, b) for a, b in zip(item.sentence.split(), changed.split()) if a != b]
    assert len(changed.split()) == len(item.sentence.split()) and len(differing) == 1
    assert set(differing[0]) == {"red", "blue"}


def test_block_world_default_source(blocks):
    assert blocks.has_counterfactuals and blocks.num_attributes == 5 and blocks.embedding_dim == 384
    assert blocks.attribute_names == DEFAULT_SCHEMA.names
    for split in ("train", "val", "probe", "test"):
        tables = blocks.split_tables(split)
        torch.testing.assert_close(tables["z"].norm(dim=1), torch.ones(40))
        sentences = [item.sentence for item in blocks.items(split)]
        assert [read_attributes(DEFAULT_SCHEMA, s) for s in sentences] == tables["attributes"].long().tolist()
    test = blocks.split_tables("test")
    assert set(test) == {"z", "attributes", "target", "z_star"}
    counterfactuals = [item.sentence for item in blocks.counterfactual_items("test")]
    assert [read_attributes(DEFAULT_SCHEMA, s) for s in counterfactuals] == test["target"].long().tolist()
    torch.testing.assert_close(test["z_star"].norm(dim=1), torch.ones(40))
    # z_star is the embedding of the counterfactual sentence: closer to its own item than to the others
    similarity = test["z_star"] @ test["z"].T
    assert (similarity.argmax(dim=1) == torch.arange(40)).float().mean() > 0.5
    batch = blocks.gather({"index": torch.tensor([3, 1])}, "val")
    assert set(batch) == {"index", "z", "attributes", "target", "z_star"}


def test_neighbour_pool_is_train_probe_and_the_evaluated_split(blocks):
    z, attributes = blocks.neighbour_pool("test")
    expected = [blocks.split_tables(split) for split in ("train", "probe", "test")]
    assert torch.equal(z, torch.cat([tables["z"] for tables in expected]))
    assert torch.equal(attributes, torch.cat([tables["attributes"] for tables in expected]))
    assert len(blocks.neighbour_pool("train")[0]) == 80  # train once, then probe


def test_shape_world_counterfactuals_are_the_re_rendered_targets():
    shapes = AttributeEmbeddingsDataModule(world="shapes", seed=1, **BLOCK_SIZES)
    assert shapes.attribute_names == SHAPE_ATTRIBUTES and shapes.embedding_dim == 1024
    test = shapes.split_tables("test")
    scenes, counterfactuals = shapes.items("test"), shapes.counterfactual_items("test")
    assert [scene.attributes for scene in scenes] == test["attributes"].long().tolist()
    assert [scene.attributes for scene in counterfactuals] == test["target"].long().tolist()
    for scene, changed in zip(scenes, counterfactuals):  # the nuisance values are kept
        assert replace(changed, **dict(zip(SHAPE_ATTRIBUTES, scene.attributes))) == scene
    torch.testing.assert_close(test["z_star"], default_embedder()(counterfactuals))
    torch.testing.assert_close(test["z"].norm(dim=1), torch.ones(40))


def test_unknown_world_is_named():
    with pytest.raises(ValueError, match=r"world must be one of \('sentences', 'shapes'\), got 'images'"):
        AttributeEmbeddingsDataModule(world="images")
