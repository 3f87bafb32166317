"""Flow-matching data: toys, digits, MNIST IDX and arrays; source draws; cluster-mate batches."""

import gzip

import numpy as np
import pytest
import torch

from datamodules import point_sets
from datamodules.cluster_batches import ClusterMateBatches
from datamodules.flow_data import FlowDataModule
from datamodules.index_batches import IndexBatchLoader
from modules.losses.flow_matching import cluster_mate_pairs


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_toys_are_seeded_and_held_out_data_does_not_depend_on_the_training_seed():
    a, b = FlowDataModule(dataset="moons", num_train=500, seed=0), FlowDataModule(dataset="moons", num_train=500, seed=1)
    assert a.train_split["x"].shape == (500, 2) and a.sample_shape == [2]
    assert torch.equal(a.train_split["x"], FlowDataModule(dataset="moons", num_train=500).train_split["x"])
    assert not torch.equal(a.train_split["x"], b.train_split["x"])
    board = point_sets.checkerboard(4000, seed=0)
    cells = torch.floor(board + 2).long()
    assert ((cells.sum(1) % 2) == 0).all() and board.abs().max() <= 2  # only the dark squares
    assert torch.allclose(board.mean(0), torch.zeros(2), atol=0.1)


def test_digits_split_is_fixed_disjoint_and_scaled():
    data = FlowDataModule(dataset="digits")
    train, held_out = data.train_split, data.eval_split
    assert train["x"].shape[1:] == (1, 8, 8) and len(train["x"]) + len(held_out["x"]) == 1797
    assert len(held_out["x"]) == 359 and train["x"].min() == -1 and train["x"].max() == 1
    assert torch.equal(held_out["x"], FlowDataModule(dataset="digits", seed=5).eval_split["x"])
    train_rows = {tuple(row.tolist()) for row in train["x"].flatten(1)}
    overlap = sum(tuple(row.tolist()) in train_rows for row in held_out["x"].flatten(1))
    assert overlap < 5  # digits holds a few exact duplicate images; the split itself is disjoint by index


def test_mnist_idx_files_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 10, 30)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:6])
    data = FlowDataModule(dataset="mnist", path=str(tmp_path))
    assert data.train_split["x"].shape == (30, 1, 28, 28) and data.eval_split["x"].shape == (6, 1, 28, 28)
    assert torch.allclose(data.train_split["x"][3, 0], torch.from_numpy(images[3]).float() / 127.5 - 1)
    assert torch.equal(data.train_split["y"], torch.from_numpy(labels))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: not an IDX file of unsigned bytes"):
        FlowDataModule(dataset="mnist", path=str(tmp_path / "bad")).train_split
    write_idx(tmp_path / "bad" / "train-images-idx3-ubyte", images)
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes((tmp_path / "bad" / "train-images-idx3-ubyte").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"header says shape \(30, 28, 28\)"):
        point_sets.read_idx(tmp_path / "bad" / "train-images-idx3-ubyte")


def test_user_arrays_and_their_errors(tmp_path):
    np.save(tmp_path / "images.npy", np.random.default_rng(0).normal(size=(50, 6, 6)).astype(np.float32))
    data = FlowDataModule(dataset="npy", path=str(tmp_path / "images.npy"))
    assert data.sample_shape == [1, 6, 6] and len(data.train_split["x"]) == 40
    images = np.zeros((20, 3, 3), dtype=np.float32)
    images[7, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", images)
    with pytest.raises(ValueError, match=r"nan.npy: 1 samples hold NaN or inf \(first: 7\)"):
        FlowDataModule(dataset="npy", path=str(tmp_path / "nan.npy")).train_split
    np.save(tmp_path / "flat.npy", np.zeros(10))
    with pytest.raises(ValueError, match=r"flat.npy: expected numeric samples .* got shape \(10,\)"):
        FlowDataModule(dataset="npy", path=str(tmp_path / "flat.npy")).train_split
    with pytest.raises(ValueError, match="reads from data.path"):
        FlowDataModule(dataset="npy")
    with pytest.raises(ValueError, match=r"'8gaussians' is 2-D; the data has samples of shape \(1, 8, 8\)"):
        FlowDataModule(dataset="digits", source="8gaussians").setup("fit")


def materialized(data: FlowDataModule, batch: dict) -> dict:
    return data.on_after_batch_transfer(batch, 0)


def test_batches_carry_index_source_draws_and_cluster_ids():
    data = FlowDataModule(dataset="moons", num_train=256, batch_size=64, source="8gaussians")
    batch = materialized(data, next(iter(data.train_dataloader())))
    assert set(batch) == {"index", "x0", "t", "noise", "x"} and batch["x0"].shape == (64, 2)
    assert torch.equal(batch["x"], data.train_split["x"][batch["index"]])
    assert batch["t"].shape == (64,) and batch["t"].dtype == torch.float32
    assert (batch["t"] >= 0).all() and (batch["t"] < 1).all() and batch["noise"].shape == batch["x"].shape
    radius = batch["x0"].norm(dim=1)
    assert (radius > 1.0).all() and (radius < 3.0).all()  # eight Gaussians on the circle of radius 2
    data.set_cluster_assignments(torch.arange(256) % 7)
    batch = materialized(data, next(iter(data.train_dataloader())))
    assert torch.equal(batch["cluster"], batch["index"] % 7)
    data.set_cluster_assignments(torch.arange(256) % 3)  # recomputed clusters reach the next batches
    batch = materialized(data, next(iter(data.train_dataloader())))
    assert torch.equal(batch["cluster"], batch["index"] % 3)
    with pytest.raises(ValueError, match="do not match the 256 training items"):
        data.set_cluster_assignments(torch.zeros(10, dtype=torch.long))


def test_evaluation_draws_the_same_noise_every_epoch_and_training_does_not():
    data = FlowDataModule(dataset="moons", num_train=256, num_eval=100, batch_size=64)
    val, train = data.val_dataloader(), data.train_dataloader()
    first_val, first_train = next(iter(val))["x0"], next(iter(train))
    val.sampler.set_epoch(3)
    train.sampler.set_epoch(3)
    assert torch.equal(next(iter(val))["x0"], first_val)
    assert not torch.equal(next(iter(train))["index"], first_train["index"])
    train.sampler.set_epoch(0)  # a resumed epoch draws the same batches and noise again
    again = next(iter(train))
    assert torch.equal(again["index"], first_train["index"]) and torch.equal(again["x0"], first_train["x0"])


def cluster_sizes_ids(sizes: list[int], seed: int = 0) -> torch.Tensor:
    ids = torch.cat([torch.full((size,), c) for c, size in enumerate(sizes)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


def test_cluster_mate_batches_hold_m_clusters_of_n_and_cover_every_item():
    ids = cluster_sizes_ids([40, 24, 16, 8, 32])  # 120 items, all sizes multiples of n=4
    sampler = ClusterMateBatches(len(ids), batch_size=24, samples_per_cluster=4, cluster_ids=lambda: ids, seed=3)
    batches = sampler.rank_batches(sampler.generator())
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        groups = ids[batch].view(6, 4)
        assert (groups == groups[:, :1]).all()  # each run of 4 is one cluster
        assert len(batch.unique()) == 24
        assert cluster_mate_pairs(ids[batch], item_ids=batch)[1].all()  # every sample has a mate
    assert len(torch.cat(batches).unique()) == 120  # 30 groups, 5 x 6 used: every item once


def test_small_clusters_are_topped_up_from_themselves_and_singletons_have_no_valid_mate():
    ids = cluster_sizes_ids([1, 5, 2, 40])
    sampler = ClusterMateBatches(len(ids), batch_size=12, samples_per_cluster=4, cluster_ids=lambda: ids)
    batches = torch.cat(sampler.rank_batches(sampler.generator())).view(-1, 4)
    for group in batches:
        assert len(ids[group].unique()) == 1
        if ids[group[0]] == 0:  # the singleton repeated: no valid pair
            assert not cluster_mate_pairs(ids[group], item_ids=group)[1].any()
        if ids[group[0]] == 1:  # 5 members in groups of 4: the short group borrows members of its own cluster
            assert len(group.unique()) == 4


def test_cluster_mate_batches_split_the_global_batch_over_ranks():
    ids = cluster_sizes_ids([30, 30, 20, 20, 28])
    single = ClusterMateBatches(128, 32, 4, lambda: ids, seed=1)
    ranks = [ClusterMateBatches(128, 16, 4, lambda: ids, seed=1, rank=r, world_size=2) for r in range(2)]
    single_batches = single.rank_batches(single.generator())
    rank_batches = [r.rank_batches(r.generator()) for r in ranks]
    assert len(single_batches) == len(rank_batches[0]) == 4
    for i, batch in enumerate(single_batches):
        assert torch.equal(batch, torch.cat([rank_batches[0][i], rank_batches[1][i]]))


def test_cluster_mate_batches_need_assignments_and_a_divisible_batch():
    sampler = ClusterMateBatches(64, 16, 4, lambda: None)
    with pytest.raises(RuntimeError, match="add the ClusterAssignment callback"):
        list(IndexBatchLoader(sampler))
    with pytest.raises(ValueError, match="samples_per_cluster=5 must be at least 2 and divide batch_size=16"):
        ClusterMateBatches(64, 16, 5, lambda: None)


def test_valid_pair_ratio_with_and_without_the_sampler():
    """At batch 64 and 100 balanced clusters, random batches leave most samples without a mate."""
    ids = torch.arange(2000) % 100
    ratios = []
    for samples_per_cluster in (0, 4):
        data = FlowDataModule(dataset="moons", num_train=2000, batch_size=64, samples_per_cluster=samples_per_cluster)
        data.set_cluster_assignments(ids)
        ratios.append(torch.stack([cluster_mate_pairs(ids[b["index"]], item_ids=b["index"])[1].float().mean()
                                   for b in data.train_dataloader()]).mean())
    random_ratio, mate_ratio = ratios
    assert random_ratio < 0.5 and mate_ratio == 1.0
