"""How fused_wloss finds its kernels: the prebuilt modules, a JIT build of the same sources,
the reference forced by environment, and a clean fallback (one warning) when no build works.
Each case runs in a fresh interpreter, since the operators can be registered once per process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_wloss

PROBE = textwrap.dedent(
    """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fused_wloss
    import torch, torch.nn.functional as F
    x = torch.randn(37, 45, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 45, (37,))
    loss = fused_wloss.cross_entropy(x, y, class_weighting="inverse", reduction="sample_mean")
    counts = torch.bincount(y, minlength=45).double()
    expected = (F.cross_entropy(x, y, reduction="none") / (counts + 1)[y]).mean()
    assert torch.allclose(loss, expected), (loss, expected)
    print("backend", fused_wloss.backend("cpu"), "isa", fused_wloss.cpu_isa())
    print("cuda kernels", fused_wloss._extension.has_cuda_kernels())
    print("warnings", [str(w.message) for w in caught if "fused_wloss" in str(w.message)])
    """
)


def _probe(tmp_path, **env):
    full_env = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full_env,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_reference_forced_by_environment(tmp_path):
    out = _probe(tmp_path, FUSED_WLOSS_BACKEND="reference")
    assert "backend reference isa None" in out
    assert "warnings []" in out


@pytest.mark.skipif(fused_wloss.backend("cpu") != "extension", reason="the prebuilt extension is not installed")
def test_jit_build_of_the_same_sources(tmp_path):
    """FUSED_WLOSS_JIT=1 compiles csrc/ with torch.utils.cpp_extension.load and serves from it,
    the CUDA kernels included where a toolkit is found (for one architecture, to keep it short)."""
    from fused_wloss import _build

    out = _probe(tmp_path, FUSED_WLOSS_JIT="1", FUSED_WLOSS_BUILD_DIR=str(tmp_path / "build"), MAX_JOBS="2",
                 TORCH_CUDA_ARCH_LIST="9.0")
    assert "backend extension isa" in out and "isa None" not in out
    assert "warnings []" in out
    assert f"cuda kernels {_build.cuda_build_reason() is None}" in out, out


def test_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path):
    out = _probe(tmp_path, FUSED_WLOSS_JIT="1", FUSED_WLOSS_BUILD_DIR=str(tmp_path / "build"), CXX="false")
    assert "backend reference isa None" in out
    line = [ln for ln in out.splitlines() if ln.startswith("warnings")][0]
    assert line.count("compiled kernels unavailable") == 1, line


@pytest.mark.skipif(fused_wloss.backend("cpu") != "extension", reason="the prebuilt extension is not installed")
def test_best_instruction_set_is_installed_and_really_vectorised():
    """The installed kernels are the best build this CPU runs, and that build's machine code uses
    the instruction set's registers (a default-flags build would not)."""
    import shutil

    import torch
    from fused_wloss import _extension

    capability = torch.backends.cpu.get_cpu_capability()
    best = _extension.available_cpu_isas()[0]
    assert fused_wloss.cpu_isa() == best.upper()
    if capability in ("AVX512", "AVX2"):
        assert best == capability.lower()
    objdump = shutil.which("objdump")
    if objdump is None or best == "default":
        pytest.skip("objdump not available, or no vector ISA on this CPU")
    register = {"avx512": "zmm", "avx2": "ymm"}[best]
    code = subprocess.run([objdump, "-d", _extension._isa_modules[best].__file__], capture_output=True, text=True).stdout
    assert code.count(register) > 100, f"the {best} build uses few {register} registers"


def test_cuda_arch_list_follows_the_visible_gpus(monkeypatch):
    """TORCH_CUDA_ARCH_LIST wins; unset, the visible GPUs' capabilities (PTX for the highest, as
    torch's own extension builds); with no GPU, the defaults, PTX on the highest."""
    from fused_wloss import _build

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5")
    assert _build.cuda_arch_list() == "7.5"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    caps = {0: (9, 0), 1: (7, 5), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: caps[i])
    assert _build.cuda_arch_list() == "7.5;9.0+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;9.0+PTX"  # what torch's build then reads
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cuda_arch_list() == _build.DEFAULT_CUDA_ARCH_LIST
    assert _build.DEFAULT_CUDA_ARCH_LIST.endswith("+PTX")
