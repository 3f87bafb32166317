"""faiss k-means (recovery, inertia, determinism, empty-cluster fix-up) and the assignments.csv file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from clustering.kmeans import (
    check_num_clusters,
    drop_empty_clusters,
    kmeans,
    kmeans_sample,
    nearest_centroids,
    read_assignments,
    write_assignments,
)


def gaussian_blobs(num_blobs: int = 4, per_blob: int = 50, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_blobs, dim)) * 10
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centers[labels] + rng.normal(size=(len(labels), dim))
    return torch.from_numpy(points.astype(np.float32)), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_separated_blobs_are_recovered(seed):
    points, labels = gaussian_blobs(seed=seed)
    # Random initialisation lands two centroids in one blob in about half the single runs;
    # the best of ten restarts finds the blobs.
    result = kmeans(points, 4, seed=seed, nredo=10, gpu=False)
    assert result.centroids.shape == (4, 8) and result.centroids.dtype == torch.float32
    assert result.assignments.shape == (200,) and result.assignments.dtype == torch.int64
    assert result.dropped_empty == 0
    assert adjusted_rand_score(labels, result.assignments.numpy()) == 1.0


def test_inertia_matches_a_hand_recomputation():
    points, _ = gaussian_blobs(seed=1)
    result = kmeans(points, 4, nredo=10, gpu=False)
    by_hand = sum(
        float(((points[i].double() - result.centroids[c].double()) ** 2).sum())
        for i, c in enumerate(result.assignments.tolist())
    )
    assert result.inertia == pytest.approx(by_hand, rel=1e-9)
    # Unit-variance noise in 8-D: about 8 per point.
    assert 6 * 200 < result.inertia < 10 * 200


def test_assignments_are_the_nearest_centroid():
    points, _ = gaussian_blobs(num_blobs=3, per_blob=30, seed=2)
    result = kmeans(points, 5, gpu=False)  # more clusters than blobs: blobs get split
    nearest = torch.cdist(points, result.centroids).argmin(dim=1)
    assert torch.equal(result.assignments, nearest)


def test_same_seed_same_result_on_cpu():
    points = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))  # no structure: init matters
    first = kmeans(points, 7, seed=3, gpu=False)
    second = kmeans(points, 7, seed=3, gpu=False)
    other = kmeans(points, 7, seed=4, gpu=False)
    assert torch.equal(first.centroids, second.centroids)
    assert torch.equal(first.assignments, second.assignments)
    assert first.inertia == second.inertia
    assert not torch.equal(first.centroids, other.centroids)


def test_kmeans_on_its_sample_equals_kmeans_on_all_points():
    points = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    sample = kmeans_sample(1000, 4, max_points_per_centroid=50, seed=7)
    assert len(sample) == 200 and len(sample.unique()) == 200 and not torch.equal(sample, sample.sort().values)
    whole = kmeans(points, 4, seed=7, max_points_per_centroid=50, gpu=False)  # faiss subsamples 200 itself
    part = kmeans(points[sample], 4, seed=7, max_points_per_centroid=50, gpu=False)
    assert torch.equal(whole.centroids, part.centroids)
    assert not torch.equal(whole.centroids, kmeans(points[sample.sort().values], 4, seed=7, gpu=False).centroids)
    assert torch.equal(kmeans_sample(200, 4, max_points_per_centroid=50, seed=7), torch.arange(200))  # all fit
    with pytest.raises(ValueError, match="max_points_per_centroid must be >= 1, got 0"):
        kmeans_sample(10, 2, max_points_per_centroid=0)


def test_nearest_centroids_by_hand_in_any_chunking():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.tensor([[1.0, 0.0], [6.0, 0.0], [3.0, 6.0], [11.0, 1.0], [2.0, 7.0]])
    assert nearest_centroids(points, centroids).tolist() == [0, 1, 2, 1, 2]
    assert nearest_centroids(points, centroids, max_elements=3).tolist() == [0, 1, 2, 1, 2]  # a row per chunk
    with pytest.raises(ValueError, match=r"features \[N, D\] and centroids \[K, D\], got \(5, 2\) and \(3, 3\)"):
        nearest_centroids(points, torch.zeros(3, 3))


def test_more_clusters_than_points_is_refused():
    with pytest.raises(ValueError, match=r"12 clusters from only 10 points; lower the cluster count"):
        kmeans(torch.randn(10, 3), 12, gpu=False)
    with pytest.raises(ValueError, match="at least 1 cluster, got 0"):
        check_num_clusters(0, 10)
    with pytest.raises(ValueError, match="5 clusters from only 4 training samples"):
        check_num_clusters(5, 4, what="training samples")
    check_num_clusters(4, 4)


def test_bad_features_are_refused():
    points = torch.randn(20, 3)
    points[[4, 9], 1] = float("nan")
    points[11, 0] = float("inf")
    with pytest.raises(ValueError, match=r"3 of 20 rows hold NaN or inf \(first rows: \[4, 9, 11\]\)"):
        kmeans(points, 2, gpu=False)
    with pytest.raises(ValueError, match=r"shape \[N, D\].*\(20, 3, 1\)"):
        kmeans(torch.randn(20, 3, 1), 2, gpu=False)


def test_duplicate_points_leave_an_empty_cluster_that_is_dropped():
    distinct = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = distinct.repeat_interleave(5, dim=0)
    # Four centroids for three distinct points: faiss splits a cluster into two identical-ish
    # centroids and one of them is nobody's nearest (checked for this seed).
    with pytest.warns(UserWarning, match="1 of 4 clusters had no points.*3 clusters remain"):
        result = kmeans(points, 4, seed=1, gpu=False)
    assert result.dropped_empty == 1 and result.centroids.shape == (3, 2)
    assert sorted(result.assignments.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.allclose(result.centroids[result.assignments], points)
    assert adjusted_rand_score(np.repeat(np.arange(3), 5), result.assignments.numpy()) == 1.0
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_drop_empty_clusters_renumbers_in_order():
    centroids = torch.arange(10.0).view(5, 2)
    assignments = torch.tensor([4, 0, 2, 2, 4, 0])
    kept, renumbered, dropped = drop_empty_clusters(centroids, assignments)
    assert dropped == 2
    assert renumbered.tolist() == [2, 0, 1, 1, 2, 0]
    assert kept.tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]
    unchanged = drop_empty_clusters(centroids, torch.tensor([0, 1, 2, 3, 4]))
    assert unchanged[2] == 0 and unchanged[1].tolist() == [0, 1, 2, 3, 4]


def test_assignments_round_trip(tmp_path):
    assignments = torch.tensor([3, 0, 2, 2, 1])
    path = write_assignments(tmp_path / "out" / "assignments.csv", assignments)
    assert path.read_text() == "index,cluster\n0,3\n1,0\n2,2\n3,2\n4,1\n"
    assert torch.equal(read_assignments(path), assignments)
    loaded = read_assignments(tmp_path / "out", num_items=5)  # the folder works too
    assert loaded.dtype == torch.int64 and loaded.tolist() == [3, 0, 2, 2, 1]


def test_rows_may_come_in_any_order(tmp_path):
    path = tmp_path / "assignments.csv"
    path.write_text("index,cluster\n2,7\n0,5\n1,6\n\n")
    assert read_assignments(path).tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    "text, message",
    [
        ("idx,cluster\n0,1\n", r"header 'index,cluster', found 'idx,cluster'"),
        ("", r"found 'an empty file'"),
        ("index,cluster\n0,1\n1,x\n", r"assignments.csv, line 3: .*integers, found '1,x'"),
        ("index,cluster\n0,1\n1,2,3\n", r"line 3: expected 2 fields"),
        ("index,cluster\n0,1\n1,-2\n", r"line 3: .*>= 0"),
        ("index,cluster\n0,1\n1,0\n0,2\n", r"line 4: sample index 0 is duplicated \(first on line 2\)"),
        ("index,cluster\n0,1\n1,0\n3,2\n", r"sample index 2 is missing"),
        ("index,cluster\n", r"no assignments"),
    ],
)
def test_malformed_files_are_refused(tmp_path, text, message):
    path = tmp_path / "assignments.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_assignments(path)


def test_wrong_sample_count_is_refused(tmp_path):
    path = write_assignments(tmp_path / "assignments.csv", torch.zeros(4, dtype=torch.long))
    message = r"has assignments for 4 samples but the training set has 6; .*another dataset"
    with pytest.raises(ValueError, match=message):
        read_assignments(path, num_items=6)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_assignments(tmp_path / "nowhere")


def test_write_refuses_non_integer_assignments(tmp_path):
    with pytest.raises(ValueError, match="1-D integer"):
        write_assignments(tmp_path / "a.csv", torch.rand(3))
