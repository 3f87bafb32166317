"""ClusterAssignment: precomputed or k-means at fit start, in checkpoints, identical on 2 DDP ranks."""

from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.cluster_assignment import ClusterAssignment, first_of_each_index
from tools.encode_and_cluster import encode_and_cluster
from datamodules.flow_data import FlowDataModule
from clustering.kmeans import kmeans, read_assignments, write_assignments
from tests.conftest import quiet_trainer
from tests.test_cli import cli
from tests.test_cluster_flow_module import toy as flow_toy

# the module tests' tiny flow on 240 toy points in batches of 24, plain batches unless asked
toy = partial(flow_toy, num_train=240, batch_size=24, samples_per_cluster=0, source="gaussian")


class RecordBatchClusters(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch["index"].clone(), batch["cluster"].clone()))


def test_padding_repeats_are_dropped_and_rows_come_in_index_order():
    indices = torch.tensor([4, 0, 2, 1, 3, 4, 0])  # a padded sampler repeats 4 and 0
    rows = torch.tensor([40, 0, 20, 10, 30, 41, 1]).unsqueeze(1)
    unique, first = first_of_each_index(indices, rows)
    assert torch.equal(unique, torch.arange(5)) and torch.equal(first.squeeze(1), torch.tensor([0, 10, 20, 30, 40]))


def test_kmeans_at_fit_start_gives_batches_the_clusters_of_the_data(tmp_path):
    model, data = toy("cluster_neighborhood")
    assignment, recorder = ClusterAssignment(num_clusters=6, seed=3), RecordBatchClusters()
    quiet_trainer(1, tmp_path, [assignment, recorder], limit_val_batches=0).fit(model, data)
    expected = kmeans(data.train_split["x"], 6, seed=3).assignments
    assert torch.equal(assignment.assignments, expected) and torch.equal(data.cluster_ids, expected)
    for index, cluster in recorder.batches:
        assert torch.equal(cluster, expected[index])


def test_precomputed_assignments_are_read_and_a_wrong_count_names_the_file(tmp_path):
    model, data = toy("cluster_neighborhood", samples_per_cluster=4)
    clusters = torch.arange(240) % 5
    write_assignments(tmp_path / "assignments.csv", clusters)
    recorder = RecordBatchClusters()
    quiet_trainer(1, tmp_path, [ClusterAssignment(assignments=str(tmp_path)), recorder],
                  limit_val_batches=0).fit(model, data)
    for index, cluster in recorder.batches:
        assert torch.equal(cluster, clusters[index]) and (cluster.view(-1, 4) == cluster.view(-1, 4)[:, :1]).all()
    write_assignments(tmp_path / "short" / "assignments.csv", clusters[:100])
    model, data = toy("cluster_neighborhood")
    with pytest.raises(ValueError, match=r"short/assignments.csv: has assignments for 100 samples but the training set has 240"):
        quiet_trainer(1, tmp_path, [ClusterAssignment(assignments=str(tmp_path / "short"))]).fit(model, data)


def test_encode_and_cluster_output_trains_and_another_training_set_is_refused(tmp_path):
    encode_and_cluster(tmp_path / "clusters", 5, dataset="moons", num_train=240, device="cpu")
    model, data = toy("cluster_neighborhood", samples_per_cluster=4)
    callback = ClusterAssignment(assignments=str(tmp_path / "clusters" / "assignments.csv"))
    quiet_trainer(1, tmp_path, [callback], limit_train_batches=2, limit_val_batches=0).fit(model, data)
    assert torch.equal(data.cluster_ids, read_assignments(tmp_path / "clusters"))
    other_seed = FlowDataModule(dataset="moons", num_train=240, batch_size=24, seed=1)  # same size, other points
    with pytest.raises(ValueError, match="clusters.json: the clusters were made from a different training set"):
        quiet_trainer(1, tmp_path, [ClusterAssignment(assignments=str(tmp_path / "clusters"))]).fit(model, other_seed)


def test_too_many_clusters_fail_before_training(tmp_path):
    model, data = toy()
    with pytest.raises(ValueError, match="1000.*240"):
        quiet_trainer(1, tmp_path, [ClusterAssignment(num_clusters=1000)]).fit(model, data)


def test_recomputed_every_n_epochs_and_kept_in_checkpoints(tmp_path):
    model, data = toy("cluster_neighborhood")
    assignment = ClusterAssignment(num_clusters=4, every_n_epochs=2)
    runs = []

    class CountRuns(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            runs.append(assignment.computed_at_epoch)

    trainer = quiet_trainer(3, tmp_path, [assignment, CountRuns()], limit_val_batches=0)
    trainer.fit(model, data)
    assert runs == [0, 0, 2]
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    restored = ClusterAssignment(num_clusters=4, every_n_epochs=2)
    restored.load_state_dict(checkpoint["callbacks"]["ClusterAssignment"])
    assert torch.equal(restored.assignments, assignment.assignments) and restored.computed_at_epoch == 2


def test_two_ddp_ranks_train_with_identical_assignments_equal_to_one_process_kmeans(tmp_path):
    args = ["--config", "configs/cluster_flow_toy.yaml", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--data.init_args.num_train", "301", "--data.init_args.batch_size", "16",
            "--data.init_args.eval_batch_size", "64",  # 301 items in shards of 151 and 150
            "--model.init_args.hidden_dim", "32", "--trainer.callbacks+=tests.cluster_dump.DumpClusterIds"]
    cli("fit", *args)
    rank0, rank1 = (torch.load(tmp_path / f"cluster_ids_rank{r}.pt") for r in range(2))
    assert rank0.shape == (301,) and torch.equal(rank0, rank1)
    data = FlowDataModule(dataset="moons", num_train=301)
    assert torch.equal(rank0, kmeans(data.train_split["x"], 16, seed=0).assignments)
