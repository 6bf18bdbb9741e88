"""Values and gradients of every option: against torch where torch has the option, against the
literal torch.nn.functional + bincount statement of the extras otherwise. Runs every
implementation (the public functions, on whichever backend serves the CPU, and the reference)."""

import pytest
import torch
import torch.nn.functional as F

import literal
from helpers import assert_close, value_and_grad
from samples import bce_samples, cross_entropy_samples

DTYPES = (torch.float32, torch.float64)


def _ids(samples):
    return [s.name for s in samples]


CE_SAMPLES = list(cross_entropy_samples())
BCE_SAMPLES = list(bce_samples())


def _cast(sample, dtype):
    return sample._replace(
        args=tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in sample.args),
        kwargs={k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()},
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", CE_SAMPLES, ids=_ids(CE_SAMPLES))
def test_cross_entropy(ce_impl, sample, dtype):
    sample = _cast(sample, dtype)
    if sample.torch_ok:
        expected = value_and_grad(F.cross_entropy, sample)
    else:
        expected = value_and_grad(lambda *a, **k: literal.cross_entropy(*a, **k), sample)
        expected = tuple(e.to(dtype) for e in expected)
    out, grad = value_and_grad(ce_impl, sample)
    assert out.dtype == dtype and out.shape == expected[0].shape
    assert_close(out, expected[0], dtype, "value")
    assert_close(grad, expected[1], dtype, "input gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", BCE_SAMPLES, ids=_ids(BCE_SAMPLES))
def test_bce(bce_impl, sample, dtype):
    sample = _cast(sample, dtype)
    if sample.torch_ok:
        expected = value_and_grad(F.binary_cross_entropy_with_logits, sample)
    else:
        expected = value_and_grad(literal.binary_cross_entropy_with_logits, sample)
        expected = tuple(e.to(dtype) for e in expected)
    out, grad = value_and_grad(bce_impl, sample)
    assert out.dtype == dtype and out.shape == expected[0].shape
    assert_close(out, expected[0], dtype, "value")
    assert_close(grad, expected[1], dtype, "input gradient")


@pytest.mark.parametrize("size_average,reduce", [(None, False), (True, None), (False, None), (False, True), (True, False)])
def test_legacy_reduction_arguments(ce_impl, bce_impl, size_average, reduce):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen)
    y = torch.randint(0, 4, (6,), generator=gen)
    with pytest.warns(UserWarning):
        expected = F.cross_entropy(x, y, size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        got = ce_impl(x, y, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(got, expected)
    t = torch.rand(6, 4, generator=gen)
    with pytest.warns(UserWarning):
        expected = F.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning):
        got = bce_impl(x, t, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(got, expected)


def test_int32_targets_equal_int64(ce_impl):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 5, 3, generator=gen)
    y = torch.randint(0, 5, (9, 3), generator=gen)
    y[0, 0] = -100
    for kw in ({}, {"class_weighting": "inverse", "reduction": "sample_mean"}):
        torch.testing.assert_close(ce_impl(x, y.int(), **kw), ce_impl(x, y, **kw), rtol=0, atol=0)


def test_half_precision_follows_torch(ce_impl, bce_impl):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    t = (torch.rand(64, 10, generator=gen) < 0.2).float()
    for dtype in (torch.float16, torch.bfloat16):
        out = ce_impl(x.to(dtype), y)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), F.cross_entropy(x, y), rtol=1e-2, atol=1e-2)
        out = bce_impl(x.to(dtype), t.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), F.binary_cross_entropy_with_logits(x, t), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_classes_with_label_smoothing_keeps_the_graph(ce_impl, reduction):
    """C = 0: every target is ignored; the loss is 0 ("mean": NaN, 0 / 0) and the input's gradient
    is a zero tensor, not missing; label smoothing adds nothing (there is no class to smooth over)."""
    x = torch.zeros(3, 0, dtype=torch.float64, requires_grad=True)
    t = torch.full((3,), -100)
    loss = ce_impl(x, t, label_smoothing=0.1, reduction=reduction)
    expected = {"none": torch.zeros(3, dtype=torch.float64), "sum": torch.tensor(0.0, dtype=torch.float64),
                "mean": torch.tensor(float("nan"), dtype=torch.float64)}[reduction]
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == (3, 0)
