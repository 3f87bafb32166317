"""Cosine kNN: self excluded, faiss and torch agree, bad k refused."""

import pytest
import torch

from clustering.knn import cosine_knn


def test_nearest_neighbours_by_hand():
    # Angles 0, 10, 30 and 180 degrees: the nearest of each is obvious.
    angles = torch.tensor([0.0, 10.0, 30.0, 180.0]).deg2rad()
    points = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    assert cosine_knn(points, 1, backend="torch").flatten().tolist() == [1, 0, 1, 2]
    assert cosine_knn(points, 2, backend="faiss").tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_is_never_a_neighbour_even_for_duplicates(backend):
    points = torch.randn(50, 8)
    points[10] = points[11] = points[12]  # ties with self
    neighbours = cosine_knn(points, 5, backend=backend)
    assert neighbours.shape == (50, 5)
    assert not (neighbours == torch.arange(50).unsqueeze(1)).any()
    assert set(neighbours[10, :2].tolist()) == {11, 12}


def test_faiss_and_torch_agree():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    faiss_nn = cosine_knn(points, 10, backend="faiss")
    torch_nn = cosine_knn(points, 10, backend="torch", chunk_size=64)  # several chunks
    assert (faiss_nn == torch_nn).float().mean() > 0.99  # float ties may swap order


def test_k_must_leave_room_for_self():
    with pytest.raises(ValueError, match="k=10 nearest neighbours need at least k\\+1 points.*has 10"):
        cosine_knn(torch.randn(10, 3), 10)
