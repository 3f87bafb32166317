"""ClusterAssignment: precomputed or k-means at fit start, in checkpoints, identical on 2 DDP ranks."""

import logging
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.cluster_assignment import ClusterAssignment
from callbacks.random_state import RandomState
from clustering.kmeans import kmeans, kmeans_sample, read_assignments, write_assignments
from clustering.prototypes import PrototypeMemory, first_of_each_index
from datamodules.flow_data import FlowDataModule
from tests.conftest import quiet_trainer
from tests.test_cli import cli
from tests.test_cluster_flow_module import toy as flow_toy
from tests.test_index_tables import InterruptAtStep, Interrupted
from tools.encode_and_cluster import encode_and_cluster

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


def test_bounded_sample_with_the_global_seed_equals_kmeans_on_all_items_and_fills_the_module_memory(
        tmp_path, monkeypatch):
    model, data = toy("cluster_neighborhood")
    model.cluster_prototypes = PrototypeMemory(6, 2)
    assignment = ClusterAssignment(num_clusters=6, max_points_per_centroid=10, prototypes_attr="cluster_prototypes")
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test
    L.seed_everything(3)  # the seed k-means takes when the callback names none
    quiet_trainer(1, tmp_path, [assignment], limit_val_batches=0).fit(model, data)
    assert len(kmeans_sample(240, 6, 10, seed=3)) == 60  # k-means fits 60 of the 240 items
    expected = kmeans(data.train_split["x"], 6, seed=3, max_points_per_centroid=10)  # faiss's own subsample
    assert torch.equal(assignment.assignments, expected.assignments) and torch.equal(data.cluster_ids, expected.assignments)
    assert torch.equal(model.cluster_prototypes.prototypes, expected.centroids) and assignment.prototypes is None
    assert model.cluster_prototypes.counts.sum() == 60
    other = ClusterAssignment(num_clusters=5, prototypes_attr="cluster_prototypes")
    with pytest.raises(ValueError, match="cluster_prototypes holds 6 prototypes; ClusterAssignment makes num_clusters=5"):
        quiet_trainer(1, tmp_path, [other]).fit(model, data)


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
    for name, value in assignment.prototypes.state_dict().items():  # the centroids the ids came from
        assert torch.equal(restored.prototypes.state_dict()[name], value), name
    assert torch.equal(restored.prototypes.nearest(data.train_split["x"]), assignment.assignments)


def test_a_fit_stopped_mid_epoch_resumes_with_its_clusters_to_the_straight_weights(tmp_path, caplog):
    """Cluster-mate batches, k-means at fit start, checkpoint at step 13 (epoch 1, batch 3 of 10):
    Lightning resumes that epoch without on_train_epoch_start, so the restored ids must reach the
    data at train start; the resumed fit ends where the straight one does, its clusters unchanged."""
    caplog.set_level(logging.INFO)

    def run(root, callbacks=(), ckpt_path=None):
        L.seed_everything(0)
        model, data = toy("cluster_neighborhood", samples_per_cluster=4)
        assignment = ClusterAssignment(num_clusters=6, seed=3)
        checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=13)
        trainer = quiet_trainer(2, root, [checkpoint, RandomState(), assignment, *callbacks], limit_val_batches=0)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model, data, trainer

    straight, straight_data, straight_trainer = run(tmp_path / "straight")
    assert "k-means: 6 clusters of 240 items" in caplog.text
    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", [InterruptAtStep(13)])
    path = tmp_path / "resumed/checkpoints/last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_yielded": 3}]
    caplog.clear()
    resumed, resumed_data, resumed_trainer = run(tmp_path / "resumed", ckpt_path=str(path))
    assert "Restored all states" in caplog.text and "k-means:" not in caplog.text  # the saved ids, not a new run
    assert resumed_trainer.global_step == straight_trainer.global_step == 20
    assert torch.equal(resumed_data.cluster_ids, saved["callbacks"]["ClusterAssignment"]["assignments"])
    assert torch.equal(resumed_data.cluster_ids, straight_data.cluster_ids)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name


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


def test_bounded_sample_two_ddp_ranks_assign_as_one_process(tmp_path):
    (tmp_path / "callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: callbacks.cluster_assignment.ClusterAssignment\n"
        "      init_args: {num_clusters: 16, max_points_per_centroid: 8}\n"
        "    - class_path: tests.cluster_dump.DumpClusterIds\n")
    cli("fit", "--config", "configs/cluster_flow_toy.yaml", "--config", str(tmp_path / "callbacks.yaml"),
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_val_batches", "0",
        "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--data.init_args.num_train", "301", "--data.init_args.batch_size", "16",
        "--data.init_args.eval_batch_size", "64", "--model.init_args.hidden_dim", "32")
    ids = [torch.load(tmp_path / f"cluster_ids_rank{r}.pt") for r in range(2)]
    prototypes = [torch.load(tmp_path / f"prototypes_rank{r}.pt") for r in range(2)]
    assert len(kmeans_sample(301, 16, 8, seed=0)) == 128  # the sample, not the 301 items
    expected = kmeans(FlowDataModule(dataset="moons", num_train=301).train_split["x"], 16, seed=0,
                      max_points_per_centroid=8)
    for rank in range(2):
        assert torch.equal(ids[rank], expected.assignments)
        assert torch.equal(prototypes[rank]["prototypes"][: expected.num_clusters], expected.centroids)
        assert prototypes[rank]["counts"].sum() == 128
