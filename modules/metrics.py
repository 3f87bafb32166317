"""Clustering metrics (torchmetrics), cluster occupancy and paraphrase retrieval, correct over DDP ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric, MetricCollection
from torchmetrics.clustering import AdjustedMutualInfoScore, AdjustedRandScore, NormalizedMutualInfoScore
from torchmetrics.functional.clustering import adjusted_rand_score, normalized_mutual_info_score
from torchmetrics.functional.clustering.mutual_info_score import (
    _mutual_info_score_compute,
    _mutual_info_score_update,
)
from torchmetrics.functional.clustering.utils import calculate_entropy, calculate_generalized_mean
from torchmetrics.retrieval import RetrievalHitRate
from torchmetrics.utilities import dim_zero_cat


def label_metrics(num_clusters: int, num_classes: int) -> MetricCollection:
    """ACC (Hungarian matching), NMI, ARI and AMI of predicted clusters against labels."""
    return MetricCollection(
        {
            "acc": HungarianAccuracy(num_clusters, num_classes),
            "nmi": NormalizedMutualInfoScore(average_method="arithmetic"),
            "ari": AdjustedRandScore(),
            "ami": FastAdjustedMutualInfoScore(average_method="arithmetic"),
        }
    )


def label_agreement(clusters: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ARI and NMI (arithmetic) of a fixed cluster assignment against labels, for one-off reports;
    ``label_metrics`` accumulates the same scores (and ACC, AMI) over batches and ranks."""
    return {"ari": float(adjusted_rand_score(clusters, labels)),
            "nmi": float(normalized_mutual_info_score(clusters, labels, average_method="arithmetic"))}


class HungarianAccuracy(Metric):
    """Clustering accuracy: the share of items whose cluster, mapped to a class by the one-to-one
    matching of clusters to classes with the most items in agreement, is their label
    (``max_m sum_k C[k, m(k)] / N`` over the contingency table ``C``; the Hungarian algorithm, here
    scipy's ``linear_sum_assignment``). With more clusters than classes the extra clusters count as
    wrong, as in torchmetrics' ``ClusterAccuracy`` on a square table, which this replaces without
    its extra dependency. The table is the only state, summed over ranks.
    """

    full_state_update = False

    def __init__(self, num_clusters: int, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clusters, self.num_classes = num_clusters, num_classes
        self.add_state("contingency", default=torch.zeros(num_clusters, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        # an index beyond the table is an IndexError here, and no host sync as a bound check would be
        self.contingency.index_put_((preds.long(), target.long()), torch.ones_like(preds, dtype=torch.long),
                                    accumulate=True)

    def compute(self) -> torch.Tensor:
        table = self.contingency.cpu().numpy()
        clusters, classes = linear_sum_assignment(table, maximize=True)
        accuracy = table[clusters, classes].sum() / max(table.sum(), 1)
        return torch.tensor(accuracy, dtype=torch.float32, device=self.contingency.device)


class ClusterOccupancy(Metric):
    """How many clusters are used, and the smallest and largest cluster's share of the items."""

    full_state_update = False

    def __init__(self, num_clusters: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_clusters = num_clusters
        self.add_state("counts", default=torch.zeros(num_clusters, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor) -> None:
        self.counts += torch.bincount(preds, minlength=self.num_clusters)

    def compute(self) -> dict[str, torch.Tensor]:
        share = self.counts.float() / self.counts.sum().clamp_min(1)
        return {
            "clusters_used": (self.counts > 0).sum().float(),
            "smallest_cluster": share.min(),
            "largest_cluster": share.max(),
        }


def expected_mutual_information(contingency: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """Expected mutual information of two clusterings under the permutation model
    (Vinh et al. 2010; sklearn's ``expected_mutual_information``), vectorized over cells.

    torchmetrics 1.9 loops over every cell and count in Python (1.5 s for 10x10 clusters of
    1,797 items); this evaluates the same sum as masked tensors, a chunk of rows at a time.
    """
    counts = contingency.double()
    n = counts.sum()
    a, b = counts.sum(dim=1), counts.sum(dim=0)
    a, b = a[a > 0], b[b > 0]
    if len(a) == 1 or len(b) == 1:
        return counts.new_zeros(())
    nij = torch.arange(1, int(torch.maximum(a.max(), b.max())) + 1, dtype=counts.dtype, device=counts.device)
    lg = torch.lgamma
    emi = counts.new_zeros(())
    for a_chunk in a.split(rows_per_chunk):
        ai, bj, k = a_chunk[:, None, None], b[None, :, None], nij[None, None, :]
        valid = (k >= (ai + bj - n).clamp_min(1)) & (k <= torch.minimum(ai, bj))
        log_p = (lg(ai + 1) + lg(bj + 1) + lg(n - ai + 1) + lg(n - bj + 1) - lg(n + 1) - lg(k + 1)
                 - lg((ai - k).clamp_min(0) + 1) - lg((bj - k).clamp_min(0) + 1)
                 - lg((n - ai - bj + k).clamp_min(0) + 1))
        terms = k / n * (torch.log(n * k) - torch.log(ai) - torch.log(bj)) * log_p.exp()
        emi = emi + torch.where(valid, terms, 0.0).sum()
    return emi


class FastAdjustedMutualInfoScore(AdjustedMutualInfoScore):
    """torchmetrics' AMI (same states, same DDP reduction) with a vectorized expected MI."""

    def compute(self) -> torch.Tensor:
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        contingency = _mutual_info_score_update(preds, target)
        mutual_info = _mutual_info_score_compute(contingency)
        expected = expected_mutual_information(contingency).to(mutual_info.dtype)
        normalizer = calculate_generalized_mean(
            torch.stack([calculate_entropy(preds), calculate_entropy(target)]), self.average_method
        )
        denominator = normalizer - expected
        eps = torch.finfo(denominator.dtype).eps
        denominator = torch.where(denominator < 0, denominator.clamp(max=-eps), denominator.clamp(min=eps))
        return (mutual_info - expected) / denominator


def paraphrase_retrieval(z: torch.Tensor, z_paraphrase: torch.Tensor, z_counterfactual: torch.Tensor,
                         counterfactual_kind: torch.Tensor | None = None, kind_names: Sequence[str] = (),
                         top_k: tuple[int, ...] = (1, 5)) -> dict[str, torch.Tensor]:
    """Paraphrase retrieval and the cosine gap (spec 004, P2 "Metrics") on held-out items.

    Each query ``z[i]`` searches a pool of every item's paraphrases ``z_paraphrase [M, P, D]``;
    ``r{k}`` is the share of queries with one of their own paraphrases among the ``k`` most
    cosine-similar entries (hit rate; spec: "Retrieval@1/5 over paraphrase pools").
    ``r{k}_with_counterfactuals`` adds every item's counterfactuals ``z_counterfactual [M, K, D]``
    to the pool as distractors worded like the queries, a harder test than the spec's.
    ``cos_gap`` is the mean over items of ``mean_p cos(z, z_p) - mean_k cos(z, z_cf_k)``; with
    ``counterfactual_kind [M, K]`` (indices into ``kind_names``), ``cos_gap_<kind>`` is the gap
    against each kind of counterfactual alone.
    """
    queries = F.normalize(z.float(), dim=-1)
    paraphrases = rearrange(F.normalize(z_paraphrase.float(), dim=-1), "m p d -> (m p) d")
    counterfactuals = rearrange(F.normalize(z_counterfactual.float(), dim=-1), "m k d -> (m k) d")
    owner = torch.arange(len(z), device=z.device)
    own_paraphrase = repeat(owner, "m -> q (m p)", q=len(z), p=z_paraphrase.shape[1]) == owner[:, None]
    no_counterfactual = own_paraphrase.new_zeros(len(z), len(counterfactuals))
    results = _hit_rates(queries @ paraphrases.T, own_paraphrase, top_k, "")
    results |= _hit_rates(queries @ torch.cat([paraphrases, counterfactuals]).T,
                          torch.cat([own_paraphrase, no_counterfactual], dim=1), top_k, "_with_counterfactuals")
    cos_paraphrase = (queries[:, None] * paraphrases.view(*z_paraphrase.shape[:2], -1)).sum(-1).mean(1)
    cos_counterfactual = (queries[:, None] * counterfactuals.view(*z_counterfactual.shape[:2], -1)).sum(-1)
    results |= {"cos_paraphrase": cos_paraphrase.mean(), "cos_counterfactual": cos_counterfactual.mean(),
                "cos_gap": cos_paraphrase.mean() - cos_counterfactual.mean()}
    if counterfactual_kind is not None:
        gaps = cos_paraphrase[:, None] - cos_counterfactual
        results |= {f"cos_gap_{name}": gaps[counterfactual_kind == index].mean()
                    for index, name in enumerate(kind_names) if (counterfactual_kind == index).any()}
    return results


def _hit_rates(similarity: torch.Tensor, relevant: torch.Tensor, top_k: tuple[int, ...],
               suffix: str) -> dict[str, torch.Tensor]:
    """torchmetrics' hit rate@k of each query (row) over its pool (columns), averaged over queries."""
    indexes = repeat(torch.arange(len(similarity), device=similarity.device), "q -> q n", n=similarity.shape[1])
    results = {}
    for k in top_k:
        hit_rate = RetrievalHitRate(top_k=k, sync_on_compute=False).to(similarity.device)
        results[f"r{k}{suffix}"] = hit_rate(similarity.flatten(), relevant.flatten(), indexes.flatten())
    return results
