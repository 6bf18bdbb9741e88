"""The nn.Module drop-ins: torch's constructor signature and buffers, plus the extras."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fused_wloss


def test_cross_entropy_module_is_a_torch_drop_in():
    w = torch.rand(5) + 0.1
    ours = fused_wloss.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)  # torch's positional order
    theirs = torch.nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(ours(x, y), theirs(x, y))


def test_bce_module_is_a_torch_drop_in():
    w, pw = torch.rand(3) + 0.1, torch.rand(3) + 0.5
    ours = fused_wloss.BCEWithLogitsLoss(w, None, None, "mean", pw)
    theirs = torch.nn.BCEWithLogitsLoss(w, None, None, "mean", pw)
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(8, 3), torch.rand(8, 3)
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_static_weights_are_buffers_that_follow_to():
    m = fused_wloss.CrossEntropyLoss(torch.ones(4), class_weighting="inverse")
    m = m.to(torch.float64)
    assert m.weight.dtype == torch.float64
    assert "weight" in dict(m.named_buffers())
    b = fused_wloss.BCEWithLogitsLoss(pos_weight=torch.ones(4)).to(torch.float64)
    assert b.pos_weight.dtype == torch.float64


def test_module_extras_match_functional():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 6, (16,), generator=gen)
    sw = torch.rand(16, generator=gen)
    m = fused_wloss.CrossEntropyLoss(reduction="sample_mean", class_weighting="inverse")
    expected = fused_wloss.cross_entropy(x, y, reduction="sample_mean", class_weighting="inverse", sample_weight=sw)
    torch.testing.assert_close(m(x, y, sample_weight=sw), expected)
    t = (torch.rand(16, 6, generator=gen) < 0.3).float()
    b = fused_wloss.BCEWithLogitsLoss(class_weighting="balanced")
    torch.testing.assert_close(b(x, t), fused_wloss.binary_cross_entropy_with_logits(x, t, class_weighting="balanced"))
    assert "class_weighting='inverse'" in repr(m)


def test_modules_deepcopy_and_pickle_roundtrip():
    import pickle

    m = fused_wloss.CrossEntropyLoss(torch.rand(3), class_weighting=fused_wloss.BatchWeighting("inverse_sqrt"))
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
        torch.testing.assert_close(clone(x, y), m(x, y))
