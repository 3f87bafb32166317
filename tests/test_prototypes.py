"""PrototypeMemory and PrototypeRefresh: per-key means and EMA by hand, 2-process DDP equal to one
process, k-means identical on both ranks, the memory and the refresh step through checkpoints."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from callbacks.prototype_refresh import PrototypeRefresh, feature_pass
from clustering.kmeans import kmeans, kmeans_sample
from clustering.prototypes import EMPTY_KEY, PrototypeMemory
from datamodules.index_tables import resolve_seed
from tests.conftest import quiet_trainer

KEYS = [10, 20, 30]


def test_per_key_means_then_ema_by_hand():
    memory = PrototypeMemory(3, 2, keys=KEYS)
    memory.refresh_means(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]), torch.tensor([10, 10, 30, 30]))
    assert memory.prototypes.tolist() == [[2.0, 3.0], [0.0, 0.0], [6.0, 7.0]] and memory.counts.tolist() == [2, 0, 2]
    # momentum 0.5: key 10 blends with its row, key 20 is filled for the first time, key 30 is unseen and kept
    memory.refresh_means(torch.tensor([[4.0, 4.0], [0.0, 0.0], [2.0, 2.0]]), torch.tensor([10, 20, 20]), momentum=0.5)
    assert memory.prototypes.tolist() == [[3.0, 3.5], [1.0, 1.0], [6.0, 7.0]] and memory.counts.tolist() == [1, 2, 2]
    memory.refresh_means(torch.tensor([[3.0, 3.5]]), torch.tensor([10]), momentum=0.5, normalize=True)
    norm = math.hypot(3.0, 3.5)
    assert torch.allclose(memory.prototypes[0], torch.tensor([3.0 / norm, 3.5 / norm]))
    assert memory.prototypes[1:].tolist() == [[1.0, 1.0], [6.0, 7.0]]  # unseen rows are not normalized


def test_sums_added_over_batches_equal_one_call():
    features, keys = torch.randn(50, 4), torch.randint(0, 3, (50,))
    whole, batched = PrototypeMemory(3, 4), PrototypeMemory(3, 4)
    whole.refresh_means(features, keys)
    parts = [batched.key_sums(f, k) for f, k in zip(features.split(7), keys.split(7))]
    batched.update_means(sum(p[0] for p in parts), sum(p[1] for p in parts))
    assert torch.allclose(whole.prototypes, batched.prototypes) and torch.equal(whole.counts, batched.counts)
    for key in range(3):
        assert torch.allclose(whole.prototypes[key], features[keys == key].mean(0))


def test_bad_input_is_named():
    memory = PrototypeMemory(3, 2, keys=KEYS)
    with pytest.raises(ValueError, match=r"keys \[40\] are not among the memory's 3 keys"):
        memory.refresh_means(torch.zeros(2, 2), torch.tensor([10, 40]))
    with pytest.raises(ValueError, match=r"shape \[N, 2\], got \(2, 3\)"):
        memory.refresh_means(torch.zeros(2, 3), torch.tensor([10, 20]))
    with pytest.raises(ValueError, match=r"keys must be 2 integers.*\(3,\)"):
        memory.refresh_means(torch.zeros(2, 2), torch.tensor([10, 20, 30]))
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\), got 1.0"):
        memory.refresh_means(torch.zeros(1, 2), torch.tensor([10]), momentum=1.0)
    with pytest.raises(ValueError, match="distinct and >= 0"):
        PrototypeMemory(3, 2, keys=[1, 1, 2])
    with pytest.raises(ValueError, match=r"3 integers, got \(2,\)"):
        PrototypeMemory(3, 2, keys=[1, 2])
    with pytest.raises(RuntimeError, match="no filled rows yet"):
        memory.nearest(torch.zeros(1, 2))


def test_kmeans_refresh_equals_kmeans_on_all_points_with_its_own_subsample():
    points = torch.randn(900, 3, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(900, generator=torch.Generator().manual_seed(1))  # rows in any order, with repeats
    memory = PrototypeMemory(5, 3)
    memory.refresh_kmeans(points[order].repeat(2, 1), order.repeat(2), seed=2, max_points_per_centroid=40)
    reference = kmeans(points, 5, seed=2, max_points_per_centroid=40, gpu=False)  # faiss subsamples 200 itself
    assert len(kmeans_sample(900, 5, 40, seed=2)) == 200
    assert torch.equal(memory.prototypes, reference.centroids) and memory.counts.sum() == 200
    assert memory.keys.tolist() == [0, 1, 2, 3, 4] and torch.equal(memory.nearest(points), reference.assignments)
    outside = points.clone()
    outside[int(torch.isin(torch.arange(900), kmeans_sample(900, 5, 40, seed=2), invert=True).nonzero()[0])] = torch.nan
    with pytest.raises(ValueError, match="k-means prototype features hold NaN or inf"):
        memory.refresh_kmeans(outside, torch.arange(900), seed=2, max_points_per_centroid=40)
    with pytest.raises(ValueError, match="features of 1 of the 200 items k-means samples are missing"):
        sample = kmeans_sample(900, 5, 40, seed=2)
        kept = torch.ones(900, dtype=torch.bool)
        kept[sample[0]] = False
        memory.refresh_kmeans(points[kept], torch.arange(900)[kept], num_items=900, seed=2, max_points_per_centroid=40)


def test_dropped_empty_clusters_leave_empty_rows():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat_interleave(5, dim=0)
    memory = PrototypeMemory(4, 2)
    with pytest.warns(UserWarning, match="1 of 4 clusters had no points"):
        memory.refresh_kmeans(points, torch.arange(15), seed=1)
    assert memory.keys.tolist() == [0, 1, 2, EMPTY_KEY] and memory.counts.tolist() == [5, 5, 5, 0]
    assert sorted(memory.nearest(points).tolist()) == [0] * 5 + [1] * 5 + [2] * 5


def test_seed_falls_back_to_the_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert resolve_seed(None) == 0 and resolve_seed(4) == 4
    L.seed_everything(17)
    assert resolve_seed(None) == 17 and resolve_seed(4) == 4


# ---- two processes on gloo against one ---------------------------------------------------------
def shared_data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(301, 4, generator=generator), torch.randint(0, 5, (301,), generator=generator) * 3


def refresh_both(memory_means: PrototypeMemory, memory_kmeans: PrototypeMemory, features, keys, indices) -> None:
    memory_means.refresh_means(features, keys)
    memory_means.refresh_means(features[::2] + 1, keys[::2], momentum=0.25, normalize=True)
    memory_kmeans.refresh_kmeans(features, indices, num_items=301, seed=5, max_points_per_centroid=12)


def new_memories() -> tuple[PrototypeMemory, PrototypeMemory]:
    return PrototypeMemory(5, 4, keys=[0, 3, 6, 9, 12]), PrototypeMemory(8, 4)


def ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    features, keys = shared_data()
    # uneven contiguous shards, and rank 1 repeats an item of rank 0 as a padded sampler does
    shard = torch.arange(0, 160) if rank == 0 else torch.cat([torch.arange(160, 301), torch.tensor([0])])
    means, clusters = new_memories()
    own = shard if rank == 0 else shard[:-1]  # per-key means count every item once
    means.refresh_means(features[own], keys[own])
    even = own[own % 2 == 0]
    means.refresh_means(features[even] + 1, keys[even], momentum=0.25, normalize=True)
    clusters.refresh_kmeans(features[shard], shard, num_items=301, seed=5, max_points_per_centroid=12)
    torch.save({"means": means.state_dict(), "kmeans": clusters.state_dict(), "nearest": clusters.nearest(features)},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_refresh_as_one_and_hold_identical_rows(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    features, keys = shared_data()
    means, clusters = new_memories()
    refresh_both(means, clusters, features, keys, torch.arange(301))
    assert len(kmeans_sample(301, 8, 12, seed=5)) == 96  # a bounded sample, not every item
    for result in ranks:
        assert torch.allclose(result["means"]["prototypes"], means.prototypes, atol=1e-6)
        assert torch.equal(result["means"]["counts"], means.counts)
        for name, value in clusters.state_dict().items():
            assert torch.equal(result["kmeans"][name], value), name
        assert torch.equal(result["nearest"], clusters.nearest(features))
    assert torch.equal(ranks[0]["means"]["prototypes"], ranks[1]["means"]["prototypes"])


# ---- the callback in a fit ---------------------------------------------------------------------
class ClassMeans(L.LightningModule):
    """A linear map trained on 2-D points, with the per-class means of its outputs as prototypes."""

    def __init__(self, momentum_probe: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 3)
        self.frozen = torch.nn.Dropout(0.5)
        self.prototypes = PrototypeMemory(4, 3)
        self.seen_modes: list[tuple[bool, bool, bool]] = []

    def prototype_features(self, batch):
        x, y = batch[:2]
        self.seen_modes.append((self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return self.layer(x), y

    def item_features(self, batch):
        x, _, index = batch
        return self.layer(x), index

    def training_step(self, batch, batch_idx):
        x, y = batch[:2]
        return (self.layer(x) - self.prototypes.prototypes[y].detach() * 0.5).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PointsData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.points = torch.randn(40, 2, generator=generator)
        self.classes = torch.arange(40) % 4

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.points, self.classes, torch.arange(40)), batch_size=8)


def fit(root, epochs, every_n_steps=3, ckpt_path=None, **trainer_args):
    torch.manual_seed(0)
    model, refresh = ClassMeans(), PrototypeRefresh(rule="means", every_n_steps=every_n_steps, momentum=0.5)
    trainer = quiet_trainer(epochs, root, [refresh], **trainer_args)
    trainer.fit(model, PointsData(), ckpt_path=ckpt_path)
    return model, refresh, trainer


def test_refreshes_in_eval_mode_under_the_precision_context_and_restores_the_modes(tmp_path):
    model, refresh, trainer = fit(tmp_path, 1, precision="bf16-mixed")
    assert refresh.last_refresh == 3  # steps 0 and 3 of the epoch's 5
    assert model.seen_modes == [(False, False, True)] * 10  # two refreshes over 5 batches each
    model.train()
    model.frozen.eval()
    with feature_pass(trainer, model):
        assert not model.training and not model.layer.training
    assert model.training and model.layer.training and not model.frozen.training  # each back in its own mode
    data = PointsData()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.layer(data.points).float()
    assert model.prototypes.counts.tolist() == [10, 10, 10, 10]
    assert torch.isfinite(model.prototypes.prototypes).all() and model.prototypes.prototypes.dtype == torch.float32
    assert not torch.allclose(model.prototypes.prototypes[0], outputs[data.classes == 0].mean(0), atol=1e-3), \
        "an EMA of two refreshes, not the last means alone"


def test_memory_and_refresh_step_resume_exactly_from_a_checkpoint(tmp_path):
    straight, straight_refresh, _ = fit(tmp_path / "straight", 3)
    _, first_refresh, trainer = fit(tmp_path / "part", 1)
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["callbacks"][first_refresh.state_key] == {"last_refresh": 3}
    restored = ClassMeans.load_from_checkpoint(path)
    for name, value in trainer.lightning_module.prototypes.state_dict().items():
        assert torch.equal(restored.prototypes.state_dict()[name], value), name
    resumed, resumed_refresh, _ = fit(tmp_path / "part", 3, ckpt_path=path)
    assert resumed_refresh.last_refresh == straight_refresh.last_refresh == 12
    for name, value in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, atol=1e-6), name


def test_one_period_only():
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_epochs"):
        PrototypeRefresh(every_n_steps=2, every_n_epochs=1)
    with pytest.raises(ValueError, match="exactly one"):
        PrototypeRefresh()


def test_kmeans_rule_clusters_the_module_features_at_each_epoch_start(tmp_path):
    torch.manual_seed(0)
    untrained = ClassMeans()
    torch.manual_seed(0)
    model = ClassMeans()
    model.clusters = PrototypeMemory(3, 3)
    refresh = PrototypeRefresh(memory_attr="clusters", features_method="item_features", rule="kmeans",
                               every_n_epochs=2, seed=1, max_points_per_centroid=10)
    quiet_trainer(2, tmp_path, [refresh]).fit(model, PointsData())
    assert refresh.last_refresh == 0  # epochs 0 and 2 are due; the fit ends after epoch 1
    with torch.no_grad():
        expected = kmeans(untrained.layer(PointsData().points), 3, seed=1, max_points_per_centroid=10, gpu=False)
    assert torch.equal(model.clusters.prototypes, expected.centroids) and model.clusters.counts.sum() == 30


class EmbeddingMeans(L.LightningModule):
    """k-means prototypes of the raw embeddings, read through the datamodule's default loader."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 2)
        self.clusters = PrototypeMemory(4, 16)

    @staticmethod
    def prototype_features(batch):
        return batch["x"], batch["index"]

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_default_loader_reads_every_training_item_once(blob_files, tmp_path):
    """160 items in batches of 48: training drops 16 of them each epoch, the refresh reads all 160."""
    from datamodules.embeddings import EmbeddingsDataModule

    data = EmbeddingsDataModule(embeddings=str(blob_files["embeddings"]), labels=str(blob_files["labels"]),
                                batch_size=48, knn=5, seed=0)
    model = EmbeddingMeans()
    refresh = PrototypeRefresh(memory_attr="clusters", rule="kmeans", every_n_epochs=1, seed=0)
    quiet_trainer(1, tmp_path, [refresh], limit_val_batches=0, enable_checkpointing=False).fit(model, data)
    expected = kmeans(data.train_split["x"], 4, seed=0, gpu=False)
    assert model.clusters.counts.sum() == 160
    assert torch.equal(model.clusters.prototypes, expected.centroids)
