"""Which source draw ``x0`` each sample ``x1`` of a training batch flows from (issue 14, spec 000).

* ``independent``: each item keeps its own draw, ``(x0, x1) ~ q(x0) q(x1)`` (conditional flow matching).
* ``minibatch_ot``: the batch's draws are reassigned to its samples by the exact optimal transport plan
  under the squared Euclidean cost (OT-CFM: Tong et al., "Improving and generalizing flow-based generative
  models with minibatch optimal transport", TMLR 2024; POT's ``ot.emd``, as torchcfm's ``OTPlanSampler``).
* ``cluster_ot``: the same within each cluster of the batch: a cluster's draws are reassigned among its own
  members only, so no pair crosses clusters (meant for cluster-mate batches).

With uniform weights on two sets of equal size the optimal plan is a permutation matrix (a vertex of the
Birkhoff polytope, which ``ot.emd``'s network simplex returns), so every draw is used exactly once. The
official code instead samples ``B`` pairs from the plan with replacement, which repeats some draws and
drops others; using the permutation keeps the batch's source marginal exact.

These run on the host, on the batch before it moves to the device (``datamodules.index_batches``'s
``host_fields``), so pairing never makes the device wait. Under DDP each rank pairs within its own batch,
as OT-CFM does per device.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ot
import torch

Pairing = Literal["independent", "minibatch_ot", "cluster_ot"]
PAIRINGS = ("independent", "minibatch_ot", "cluster_ot")


def ot_assignment(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``source [B]``: the row of ``x0`` the exact OT plan sends to each row of ``x1`` (a permutation), for
    the squared Euclidean cost between the flattened samples and uniform weights."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape to be paired, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    a, b = x0.flatten(1).double().numpy(), x1.flatten(1).double().numpy()
    weights = np.full(len(a), 1.0 / len(a))
    plan = ot.emd(weights, weights, ot.dist(a, b, metric="sqeuclidean"))
    source = plan.argmax(axis=0)
    if len(np.unique(source)) != len(source):  # ot.emd stopped at its iteration limit, short of a vertex
        raise RuntimeError(f"the OT plan of a batch of {len(source)} is not a permutation (ot.emd did not converge); "
                           "lower the batch size")
    return torch.from_numpy(source).long()


def within_cluster_assignment(x0: torch.Tensor, x1: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """``source [B]`` as ``ot_assignment`` but solved separately for the members of each cluster: the row of
    ``x0`` given to a sample is always one of its own cluster's rows."""
    if clusters.shape != x1.shape[:1]:
        raise ValueError(f"clusters must hold one id per sample, shape [{len(x1)}]; got {tuple(clusters.shape)}")
    source = torch.arange(len(x1))
    for cluster in clusters.unique():
        members = (clusters == cluster).nonzero().squeeze(1)
        source[members] = members[ot_assignment(x0[members], x1[members])]
    return source


def paired_sources(pairing: Pairing, x0: torch.Tensor, x1: torch.Tensor,
                   clusters: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's source draws reordered so that row ``i`` is the one ``x1[i]`` flows from under ``pairing``."""
    if pairing == "independent":
        return x0
    if pairing == "minibatch_ot":
        return x0[ot_assignment(x0, x1)]
    if pairing == "cluster_ot":
        if clusters is None:
            raise KeyError("pairing='cluster_ot' needs cluster ids: add the ClusterAssignment callback "
                           "(precomputed assignments.csv or k-means at fit start)")
        return x0[within_cluster_assignment(x0, x1, clusters)]
    raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
