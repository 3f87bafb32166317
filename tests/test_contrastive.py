"""InfoNCE, VICReg terms and paraphrase retrieval against values computed by hand."""

import math

import pytest
import torch

from modules.losses.contrastive import info_nce, vicreg_regularizer
from modules.metrics import paraphrase_retrieval


def test_info_nce_by_hand():
    # cosine logits [1, 0] / 1 -> -log(e / (e + 1)) = log(1 + e^-1)
    loss = info_nce(torch.tensor([[2.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 5.0]]), torch.tensor([0]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_info_nce_temperature_and_positive_index():
    # positive is key 1 with cosine 0, the negative has cosine 1; t = 0.5 -> logits [2, 0]
    loss = info_nce(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1]), 0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2.0)), abs=1e-5)


def test_extra_negatives_raise_the_loss():
    torch.manual_seed(0)
    q = torch.randn(8, 16)
    k = q + 0.1 * torch.randn(8, 16)
    base = info_nce(q, k, torch.arange(8))
    harder = info_nce(q, torch.cat([k, q + 0.05 * torch.randn(8, 16)]), torch.arange(8))
    assert harder > base


def test_info_nce_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="width"):
        info_nce(torch.randn(2, 3), torch.randn(2, 4), torch.arange(2))


def test_vicreg_terms_by_hand():
    # two dims, values (+-1, +-1) perfectly correlated: var = 4/3 (n-1=3), std = sqrt(4/3 + eps) > 1 -> hinge 0
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    terms = vicreg_regularizer(z)
    assert terms["variance"].item() == pytest.approx(0.0)
    assert terms["covariance"].item() == pytest.approx(2 * (4 / 3) ** 2 / 2, rel=1e-5)
    collapsed = vicreg_regularizer(torch.zeros(4, 2))
    assert collapsed["variance"].item() == pytest.approx(1 - math.sqrt(1e-4), abs=1e-6)


def test_paraphrase_retrieval_by_hand():
    # Paraphrase pool: both queries find their own paraphrase first. With counterfactuals in the
    # pool, item 1's nearest entry is its own counterfactual: a miss at 1, a hit at 2.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_paraphrase = torch.tensor([[[1.0, 0.1]], [[0.6, 1.0]]])
    z_counterfactual = torch.tensor([[[-1.0, 0.0]], [[0.0, 1.0]]])
    result = paraphrase_retrieval(z, z_paraphrase, z_counterfactual, torch.tensor([[0], [1]]), ("color", "count"),
                                  top_k=(1, 2))
    assert result["r1"].item() == pytest.approx(1.0)
    assert result["r1_with_counterfactuals"].item() == pytest.approx(0.5)
    assert result["r2_with_counterfactuals"].item() == pytest.approx(1.0)
    cos_p = (1 / math.hypot(1, 0.1) + 1 / math.hypot(0.6, 1.0)) / 2
    cos_c = (-1.0 + 1.0) / 2
    assert result["cos_gap"].item() == pytest.approx(cos_p - cos_c, abs=1e-6)
    # per kind: item 0's counterfactual is a color edit, item 1's a count edit
    assert result["cos_gap_color"].item() == pytest.approx(1 / math.hypot(1, 0.1) + 1.0, abs=1e-6)
    assert result["cos_gap_count"].item() == pytest.approx(1 / math.hypot(0.6, 1.0) - 1.0, abs=1e-6)


def test_paraphrase_retrieval_misses_when_another_items_paraphrase_is_nearer():
    z = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    z_paraphrase = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # item 1's paraphrase sits on query 0
    result = paraphrase_retrieval(z, z_paraphrase, torch.zeros(2, 1, 2) + 1e-3, top_k=(1, 2))
    # query 0 finds item 1's paraphrase first (miss at 1, hit at 2); query 1 finds its own
    assert result["r1"].item() == pytest.approx(0.5) and result["r2"].item() == pytest.approx(1.0)
