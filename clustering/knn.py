"""Cosine k-nearest neighbours with the query itself excluded (TEMI's pair table).

faiss does the search when it is installed; a chunked pure-torch path gives the same answer
without it. Both return neighbours sorted by decreasing cosine similarity, as the official
TEMI ``gen_embeds.compute_neighbors`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is a declared dependency
    faiss = None


def check_k(k: int, num_points: int) -> None:
    if not 1 <= k < num_points:
        raise ValueError(
            f"k={k} nearest neighbours need at least k+1 points (self is excluded), "
            f"but the data has {num_points}"
        )


def cosine_knn(embeddings: torch.Tensor, k: int, backend: str = "auto", chunk_size: int = 4096) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's ``k`` most cosine-similar other rows.

    backend: ``"faiss"``, ``"torch"`` or ``"auto"`` (faiss when importable).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {tuple(embeddings.shape)}")
    check_k(k, len(embeddings))
    if backend == "auto":
        backend = "faiss" if faiss is not None else "torch"
    normalized = F.normalize(embeddings.detach().float(), dim=1)
    if backend == "faiss":
        return _faiss_knn(normalized, k)
    if backend == "torch":
        return _torch_knn(normalized, k, chunk_size)
    raise ValueError(f"unknown kNN backend {backend!r}; use 'faiss', 'torch' or 'auto'")


def _drop_self(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Remove each row's own index from ``k+1`` candidates, keeping order.

    Exact duplicates can rank self anywhere among ties, so self is removed wherever it is;
    where it is absent (more than k+1 duplicates) the last candidate is dropped instead.
    """
    rows = torch.arange(len(indices)).unsqueeze(1)
    keep = indices != rows
    no_self = keep.all(dim=1)
    keep[no_self, -1] = False
    return indices[keep].view(len(indices), k)


def _torch_knn(normalized: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(normalized), chunk_size):
        sims = normalized[start : start + chunk_size] @ normalized.T
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -torch.inf
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out).cpu()


def _faiss_knn(normalized: torch.Tensor, k: int) -> torch.Tensor:
    data = normalized.cpu().numpy()
    index = faiss.IndexFlatIP(data.shape[1])
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(data)
    _, found = index.search(data, k + 1)
    return _drop_self(torch.from_numpy(found).long(), k)
