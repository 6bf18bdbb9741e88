import os
import tempfile

# A private inductor cache per test session: the on-disk FX graph cache does not key on a custom
# operator's fake kernel, so graphs compiled against an earlier build of the operators could be
# replayed against a newer one.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fused_wloss_inductor_"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fused_wloss  # noqa: E402
from fused_wloss import reference  # noqa: E402

# The implementations every semantic test runs: the public functions (the compiled extension where
# it serves the device, see fused_wloss.backend) and the reference itself.
CE_IMPLS = {"fused": fused_wloss.cross_entropy, "reference": reference.cross_entropy}
BCE_IMPLS = {
    "fused": fused_wloss.binary_cross_entropy_with_logits,
    "reference": reference.binary_cross_entropy_with_logits,
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: runs on a GPU (the CUDA lane selects these with -m gpu; skipped without one)",
    )
    config.addinivalue_line(
        "markers", "big: needs several GB of memory (the 2^31-element test); deselect with -m 'not big' "
        "or skip with FUSED_WLOSS_SKIP_BIG=1",
    )


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
