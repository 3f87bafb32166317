"""Batched clustering heads: equal to independent per-head networks, fast path equal to autograd."""

import pytest
import torch
import torch.nn.functional as F

from modules.networks.cluster_heads import SpecMLPHeads, TEMIHeads


def one_head_reference(heads: TEMIHeads, h: int, x: torch.Tensor) -> torch.Tensor:
    """Head ``h`` as the official DINOHead would compute it, from that head's slice of the weights."""
    hidden = F.gelu(x @ heads.hidden.weight[h] + heads.hidden.bias[h])
    features = F.normalize(hidden @ heads.bottleneck.weight[h] + heads.bottleneck.bias[h], dim=-1)
    direction = heads.last_layer.direction[h]
    weight = heads.last_layer.norm[h] * direction / direction.norm(dim=0, keepdim=True)
    return features @ weight


def test_each_head_is_an_independent_network():
    torch.manual_seed(0)
    heads = TEMIHeads(input_dim=12, num_clusters=5, num_heads=3, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        heads.hidden.bias.normal_()
        heads.last_layer.norm.uniform_(0.5, 2.0)
    x = torch.randn(20, 12)
    logits = heads(x)
    assert logits.shape == (3, 20, 5)
    for h in range(3):
        assert torch.allclose(logits[h], one_head_reference(heads, h, x), atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 3, 16])
def test_cpu_fast_path_matches_autograd_values_and_gradients(num_heads):
    torch.manual_seed(1)
    heads = TEMIHeads(input_dim=10, num_clusters=4, num_heads=num_heads, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():
        heads.hidden.bias.normal_()
        heads.bottleneck.bias.normal_()
    x = torch.randn(24, 10, requires_grad=True)
    upstream = torch.randn(num_heads, 24, 4)

    def grads(forward):
        heads.zero_grad()
        x.grad = None
        out = forward(x)
        (out * upstream).sum().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in heads.parameters()]

    fast_out, fast_grads = grads(heads)
    ref_out, ref_grads = grads(heads.reference_forward)
    assert torch.allclose(fast_out, ref_out, atol=1e-5)
    for fast, ref in zip(fast_grads, ref_grads, strict=True):
        assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the teacher's path, which builds no graph
        assert torch.allclose(heads(x), ref_out, atol=1e-5)


def test_weight_normed_last_layer_starts_with_unit_columns():
    heads = TEMIHeads(input_dim=6, num_clusters=7, num_heads=2, hidden_dim=8, bottleneck_dim=5)
    weight = heads.last_layer.effective_weight()
    assert torch.allclose(weight.norm(dim=1), torch.ones(2, 7), atol=1e-6)
    assert torch.equal(heads.last_layer.norm, torch.ones(2, 1, 7))


def test_logits_are_bounded_by_the_norm_of_the_last_layer():
    # L2-normalized features times unit-norm columns: cosine similarities in [-1, 1].
    heads = TEMIHeads(input_dim=6, num_clusters=3, num_heads=2, hidden_dim=8, bottleneck_dim=5)
    assert heads(torch.randn(50, 6) * 100).abs().max() <= 1 + 1e-5


def test_spec_heads_normalize_each_head_separately():
    torch.manual_seed(2)
    heads = SpecMLPHeads(input_dim=6, num_clusters=4, num_heads=3, hidden_dim=10, dropout=0.0).eval()
    x = torch.randn(9, 6)
    logits = heads(x)
    assert logits.shape == (3, 9, 4)
    # A head's output must not change when another head's weights do.
    with torch.no_grad():
        heads.hidden.weight[1].mul_(5)
    changed = heads(x)
    assert torch.equal(changed[0], logits[0]) and torch.equal(changed[2], logits[2])
    assert not torch.allclose(changed[1], logits[1])
