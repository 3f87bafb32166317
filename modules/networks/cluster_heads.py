"""Many clustering heads evaluated as one batched operation.

Every head sees the same input, so each layer of all heads is one batched matrix product over
heads (``bmm``) with the bias folded into it, instead of a Python loop over ``H`` modules.

On CPU, ``TEMIHeads`` runs its MLP through ``_TEMIHeadsFunction``, a hand-written forward and
backward that walks the heads a few at a time: each chunk's ``[c, N, hidden]`` activations stay
in the core's cache between the matrix products and the elementwise GELU, where whole-batch
tensors (16 MB for 16 heads of 512 x 512) would stream through memory at every operation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.autograd.function import once_differentiable

# Heads per chunk on CPU: 2 x [512 items, 512 hidden] float32 activations are 2 MB, an L2 cache.
CPU_HEADS_PER_CHUNK = 2
NORM_EPS = 1e-12  # F.normalize's default


def _ones_column(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: a product with ``[W; b]`` then adds the bias inside the matrix product."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class HeadwiseLinear(nn.Module):
    """``H`` independent linear maps: ``[H, N, in] -> [H, N, out]``, or ``[N, in] -> [H, N, out]``
    when all heads share the input."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, bias: bool = True,
                 init_std: float | None = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, out_features)) if bias else None
        if init_std is None:  # nn.Linear's default
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.weight, -bound, bound)
        else:  # DINO heads: trunc_normal_(std=0.02) with the default cut at +-2, i.e. 100 std
            nn.init.trunc_normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # a broadcast view, so the output is [H, N, out] without a transpose copy
            x = x.expand(self.weight.shape[0], -1, -1)
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class WeightNormedHeadwiseLinear(nn.Module):
    """Weight-normalized bias-free last layer, ``W = g * v / ||v||`` per output unit
    (``torch.nn.utils.weight_norm`` on ``Linear(bottleneck, K, bias=False)``), ``g`` initialized to 1."""

    def __init__(self, num_heads: int, in_features: int, out_features: int, train_norm: bool = True) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.direction = nn.Parameter(torch.empty(num_heads, in_features, out_features).uniform_(-bound, bound))
        self.norm = nn.Parameter(torch.ones(num_heads, 1, out_features), requires_grad=train_norm)

    def effective_weight(self) -> torch.Tensor:
        """``W`` of shape ``[H, in, out]``, computed once per forward."""
        return self.norm * self.direction / self.direction.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.effective_weight())


class _TEMIHeadsFunction(torch.autograd.Function):
    """``logits = normalize(gelu(x W1 + b1) W2 + b2) W3`` for all heads, chunk by chunk over heads.

    The same function as ``TEMIHeads.reference_forward``; by hand so that a chunk's hidden
    activations are produced, activated and consumed while they are in cache. Two identities
    keep the big tensors out of extra passes: the biases ride in the matrix products (``[x, 1]
    @ [W1; b1]``, ``baddbmm``), and the L2 normalization is applied to the ``K``-wide logits,
    ``normalize(z) W3 = (z W3) / max(||z||, eps)``, whose backward then needs only ``[H, N]``
    scalars besides ``dL W3^T``. Saved for backward: the pre-activations (``[H, N, hidden]``),
    the bottleneck features (``[H, N, bottleneck]``) and the logits; GELU is recomputed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                w3: torch.Tensor, heads_per_chunk: int) -> torch.Tensor:
        x1, w1b = _ones_column(x), torch.cat([w1, b1], dim=1)
        logits, saved = _temi_heads_forward(x1, w1b, w2, b2, w3, heads_per_chunk, for_backward=True)
        ctx.heads_per_chunk = heads_per_chunk
        ctx.save_for_backward(x1, w1b, w2, w3, *saved)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits: torch.Tensor):
        x1, w1b, w2, w3, pre, features, logits, norm, inv_norm = ctx.saved_tensors
        num_heads, _, hidden_dim = pre.shape
        input_dim = x1.shape[1] - 1
        # d/dz of (z W3) / ||z||  =  (dL W3^T) / ||z||  -  z (dL . logits) / ||z||^2, the second term
        # vanishing where the norm was clamped at eps (clamp_min's backward, as in F.normalize).
        scaled = grad_logits * inv_norm
        radial = (grad_logits * logits).sum(dim=-1, keepdim=True).mul_(inv_norm.square())
        radial.masked_fill_(norm < NORM_EPS, 0.0).neg_()
        grad_w3 = torch.bmm(features.transpose(1, 2), scaled)
        grad_w1b, grad_w2 = torch.empty_like(w1b), torch.empty_like(w2)
        grad_b2 = features.new_empty(num_heads, 1, w2.shape[2])
        grad_x = x1.new_zeros(x1.shape[0], input_dim) if ctx.needs_input_grad[0] else None
        chunk = min(ctx.heads_per_chunk, num_heads)
        act = pre.new_empty(chunk, pre.shape[1], hidden_dim)
        grad_features = features.new_empty(chunk, *features.shape[1:])
        for heads in _chunks(num_heads, chunk):
            a, dz = act[: heads.stop - heads.start], grad_features[: heads.stop - heads.start]
            torch.baddbmm(features[heads] * radial[heads], scaled[heads], w3[heads].transpose(1, 2), out=dz)
            torch.sum(dz, dim=1, keepdim=True, out=grad_b2[heads])
            torch.ops.aten.gelu.out(pre[heads], out=a)
            torch.bmm(a.transpose(1, 2), dz, out=grad_w2[heads])
            torch.bmm(dz, w2[heads].transpose(1, 2), out=a)  # gradient of the activations
            torch.ops.aten.gelu_backward.grad_input(a, pre[heads], grad_input=a)
            torch.bmm(x1.t().expand(len(a), -1, -1), a, out=grad_w1b[heads])
            if grad_x is not None:
                grad_x += torch.bmm(a, w1b[heads, :input_dim].transpose(1, 2)).sum(dim=0)
        grad_w1, grad_b1 = grad_w1b.split([input_dim, 1], dim=1)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, None


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _temi_heads_forward(x1: torch.Tensor, w1b: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor,
                        heads_per_chunk: int, for_backward: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logits ``[H, N, K]`` from ``x1 = [x, 1]`` and ``w1b = [W1; b1]``, and what the backward needs."""
    num_heads, _, hidden_dim = w1b.shape
    num_items, bottleneck_dim = x1.shape[0], w2.shape[2]
    pre = x1.new_empty(num_heads, num_items, hidden_dim) if for_backward else None
    act = x1.new_empty(min(heads_per_chunk, num_heads), num_items, hidden_dim)
    features = x1.new_empty(num_heads, num_items, bottleneck_dim)
    for heads in _chunks(num_heads, heads_per_chunk):
        a = act[: heads.stop - heads.start]
        if for_backward:
            torch.bmm(x1.expand(len(a), -1, -1), w1b[heads], out=pre[heads])
            torch.ops.aten.gelu.out(pre[heads], out=a)
        else:
            torch.bmm(x1.expand(len(a), -1, -1), w1b[heads], out=a)
            torch.ops.aten.gelu_(a)
        torch.baddbmm(b2[heads], a, w2[heads], out=features[heads])
    norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    inv_norm = norm.clamp_min(NORM_EPS).reciprocal_()
    logits = torch.bmm(features, w3).mul_(inv_norm)
    return logits, (pre, features, logits, norm, inv_norm) if for_backward else ()


class TEMIHeads(nn.Module):
    """Official TEMI heads (``DINOHead`` with ``nlayers=2``): per head
    ``Linear(D, hidden) -> GELU -> Linear(hidden, bottleneck) -> L2-normalize -> WN-Linear(bottleneck, K)``.

    Returns logits ``[H, N, K]``. On CPU (without autocast) the MLP runs as
    ``_TEMIHeadsFunction``; elsewhere as ``reference_forward``, the same function in autograd ops.
    """

    def __init__(self, input_dim: int, num_clusters: int, num_heads: int = 16, hidden_dim: int = 512,
                 bottleneck_dim: int = 256, train_last_norm: bool = True) -> None:
        super().__init__()
        self.hidden = HeadwiseLinear(num_heads, input_dim, hidden_dim)
        self.bottleneck = HeadwiseLinear(num_heads, hidden_dim, bottleneck_dim)
        self.last_layer = WeightNormedHeadwiseLinear(num_heads, bottleneck_dim, num_clusters, train_last_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.reference_forward(x)
        weights = (self.hidden.weight, self.hidden.bias, self.bottleneck.weight, self.bottleneck.bias,
                   self.last_layer.effective_weight())
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            return _TEMIHeadsFunction.apply(x, *weights, CPU_HEADS_PER_CHUNK)
        w1, b1, w2, b2, w3 = weights  # no graph to build (the EMA teacher): nothing is saved
        logits, _ = _temi_heads_forward(_ones_column(x), torch.cat([w1, b1], dim=1), w2, b2, w3,
                                        CPU_HEADS_PER_CHUNK, for_backward=False)
        return logits

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.bottleneck(F.gelu(self.hidden(x)))
        return self.last_layer(F.normalize(features, dim=-1))


class SpecMLPHeads(nn.Module):
    """Spec 003's heads: per head ``Linear(D, 2048) -> BatchNorm -> GELU -> Dropout(0.1) -> Linear(2048, K)``.

    Batch norm is per channel, so one ``BatchNorm1d(H * hidden)`` normalizes all heads at once.
    """

    def __init__(self, input_dim: int, num_clusters: int, num_heads: int = 16, hidden_dim: int = 2048,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.hidden = HeadwiseLinear(num_heads, input_dim, hidden_dim, init_std=None)
        self.norm = nn.BatchNorm1d(num_heads * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.last_layer = HeadwiseLinear(num_heads, hidden_dim, num_clusters, init_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = rearrange(self.hidden(x), "h n o -> n (h o)")
        hidden = self.dropout(F.gelu(self.norm(hidden)))
        return self.last_layer(rearrange(hidden, "n (h o) -> h n o", h=self.num_heads))
