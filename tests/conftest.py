import os

import pytest
import torch

import fused_wloss
from fused_wloss import reference

# The implementations every semantic test runs: the public functions (the compiled extension where
# it serves the device, see fused_wloss.backend) and the reference itself.
CE_IMPLS = {"fused": fused_wloss.cross_entropy, "reference": reference.cross_entropy}
BCE_IMPLS = {
    "fused": fused_wloss.binary_cross_entropy_with_logits,
    "reference": reference.binary_cross_entropy_with_logits,
}


def pytest_report_header(config):
    return (
        f"torch {torch.__version__}; fused_wloss backend: cpu={fused_wloss.backend('cpu')}"
        f"{', cuda=' + fused_wloss.backend('cuda') if torch.cuda.is_available() else ''}"
    )


@pytest.fixture(params=sorted(CE_IMPLS))
def ce_impl(request):
    return CE_IMPLS[request.param]


@pytest.fixture(params=sorted(BCE_IMPLS))
def bce_impl(request):
    return BCE_IMPLS[request.param]
