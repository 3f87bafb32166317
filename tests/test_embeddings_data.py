"""Embedding files, the TEMI folder layout, kNN caching, clear errors, and index batches."""


import numpy as np
import pytest
import torch

from datamodules.arrays import save_temi_folder
from datamodules.embeddings import EmbeddingsDataModule
from datamodules.index_batches import EpochPermutation, IndexBatchLoader, neighbour_draw
from tests.conftest import blob_data


def test_npy_files_with_labels_and_links(blob_files):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["labels"]), knn=5)
    assert (data.input_dim, data.num_clusters, data.num_classes) == (16, 4, 4)
    data.prepare_data()
    cache = blob_files["dir"] / "x.knn.pt"
    assert cache.exists()
    assert torch.equal(torch.load(cache), data.neighbors)


def test_npz_and_pt_archives_are_read_by_key(tmp_path):
    x, y = blob_data()
    np.savez(tmp_path / "data.npz", embeddings=x, labels=y)
    torch.save({"embeddings": torch.from_numpy(x), "labels": torch.from_numpy(y)}, tmp_path / "data.pt")
    for name in ("data.npz", "data.pt"):
        data = EmbeddingsDataModule(embeddings=str(tmp_path / name), knn=5)
        assert torch.equal(data.train_split["y"], torch.from_numpy(y)), name


def test_official_temi_folder(tmp_path):
    x, y = blob_data()
    x_test, y_test = blob_data(num_per_cluster=5, seed=1)
    save_temi_folder(tmp_path, torch.from_numpy(x), torch.from_numpy(y))
    save_temi_folder(tmp_path, torch.from_numpy(x_test), torch.from_numpy(y_test), split="-test")
    data = EmbeddingsDataModule(folder=str(tmp_path), knn=3)
    data.prepare_data()  # writes knn.pt as the official gen_embeds.py does
    assert (tmp_path / "knn.pt").exists()
    assert len(data.eval_split["x"]) == 20  # validation and test use the -test split
    assert data.neighbors.shape == (160, 3)


def test_digits_is_the_default():
    data = EmbeddingsDataModule(knn=10)
    assert data.train_split["x"].shape == (1797, 64)
    assert data.num_clusters == 10
    assert data.eval_split is data.train_split


def test_missing_file_is_named(tmp_path):
    data = EmbeddingsDataModule(embeddings=str(tmp_path / "nowhere.npy"))
    with pytest.raises(FileNotFoundError, match="nowhere.npy"):
        data.input_dim


def test_unreadable_file_is_named(tmp_path):
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="broken.npy: could not be read"):
        EmbeddingsDataModule(embeddings=str(tmp_path / "broken.npy")).input_dim


def test_label_shape_mismatch_names_both_shapes(blob_files):
    np.save(blob_files["dir"] / "short.npy", np.zeros(7, dtype=np.int64))
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["dir"] / "short.npy"))
    with pytest.raises(ValueError, match=r"short.npy: labels of shape \(7,\) do not match embeddings of shape \(160, 16\)"):
        data.input_dim


def test_wrong_rank_and_non_finite_embeddings(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match=r"flat.npy: embeddings must have shape \[N, D\], got \(10,\)"):
        EmbeddingsDataModule(embeddings=str(tmp_path / "flat.npy")).input_dim
    x = np.ones((10, 3), dtype=np.float32)
    x[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match=r"nan.npy: 1 rows hold NaN or inf \(first rows: \[4\]\)"):
        EmbeddingsDataModule(embeddings=str(tmp_path / "nan.npy")).input_dim


def test_k_and_cluster_count_larger_than_the_data(blob_files):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), knn=160)
    with pytest.raises(ValueError, match="k=160 .* the data has 160"):
        data.setup("fit")
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), num_clusters=500)
    with pytest.raises(ValueError, match=r"num_clusters=500 must lie in \[2, 160\]"):
        data.num_clusters


def test_unlabelled_data_needs_a_cluster_count(blob_files):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]))
    with pytest.raises(ValueError, match="no labels: set data.num_clusters"):
        data.num_clusters
    assert EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), num_clusters=4).num_classes is None


def test_stale_knn_cache_with_too_few_columns_is_recomputed(blob_files):
    torch.save(torch.zeros(160, 2, dtype=torch.long), blob_files["dir"] / "x.knn.pt")
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), knn=5)
    assert data.neighbors.shape == (160, 5)
    assert not (data.neighbors == torch.arange(160)[:, None]).any()


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_epochs_are_reproducible_and_differ():
    neighbours = torch.randint(0, 100, (100, 7))
    loader = IndexBatchLoader(EpochPermutation(100, 16, shuffle=True, drop_last=True, seed=3), neighbour_draw(neighbours))
    first, again, second = _epoch(loader, 0), _epoch(loader, 0), _epoch(loader, 1)
    assert len(first) == len(loader) == 6
    assert all(torch.equal(a["index"], b["index"]) and torch.equal(a["pair_index"], b["pair_index"])
               for a, b in zip(first, again))
    assert not torch.equal(first[0]["index"], second[0]["index"])
    for batch in first:  # each pair is one of the item's own neighbours
        assert (neighbours[batch["index"]] == batch["pair_index"][:, None]).any(dim=1).all()


def test_ranks_split_the_same_global_batch():
    neighbours = torch.randint(0, 100, (100, 5))
    single = IndexBatchLoader(EpochPermutation(100, 32, True, True, seed=1), neighbour_draw(neighbours))
    ranks = [IndexBatchLoader(EpochPermutation(100, 16, True, True, seed=1, rank=r, world_size=2), neighbour_draw(neighbours))
             for r in range(2)]
    for whole, part0, part1 in zip(_epoch(single, 2), _epoch(ranks[0], 2), _epoch(ranks[1], 2), strict=True):
        for key in ("index", "pair_index"):
            assert torch.equal(whole[key], torch.cat([part0[key], part1[key]]))


def test_evaluation_covers_every_item_once_across_ranks():
    shards = [list(IndexBatchLoader(EpochPermutation(101, 8, False, False, rank=r, world_size=3))) for r in range(3)]
    seen = torch.cat([batch["index"] for shard in shards for batch in shard])
    assert sorted(seen.tolist()) == list(range(101))


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="batch_size=64 x 2 ranks exceeds the 100 items"):
        EpochPermutation(100, 64, True, True, world_size=2)


def test_batches_are_gathered_on_the_device(blob_files):
    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["labels"]),
                                knn=5, normalize="standardize", batch_size=32)
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    x = data.train_split["x"]
    expected = (x[batch["index"]] - x.mean(0)) / x.std(0)
    assert torch.allclose(batch["x"], expected, atol=1e-5)
    assert torch.equal(batch["y"], data.train_split["y"][batch["index"]])
    assert batch["x_pair"].shape == batch["x"].shape
