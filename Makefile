# make setup | make test | make bench. A fresh machine with python3 goes to green with `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

# torch guesses CUDA_HOME from the nvcc on PATH, which here is a wrapper in /usr/local/bin.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup test bench clean cuda-lane cuda-lane-dry check-deep

setup: $(VENV)/.installed

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $@

# The test-only emulated CUDA kernels (fused_wloss._cuda_emu) are part of every `make setup` build.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	FUSED_WLOSS_BUILD_EMU=1 $(VPY) -m pip install --no-build-isolation -e . -v > $(VENV)/build.log 2>&1 \
	  || (tail -n 60 $(VENV)/build.log; echo "build failed: full log in $(VENV)/build.log"; exit 1)
	@grep -E '\[fused_wloss\]' $(VENV)/build.log | sed 's/^ *//' | awk '!seen[$$0]++' || true
	$(VPY) -c "import fused_wloss; print('fused_wloss', fused_wloss.__version__, 'cpu backend:', fused_wloss.backend('cpu'))"
	touch $@

test: setup
	FUSED_WLOSS_REQUIRE_EMU=1 $(VPY) -m pytest tests -q

# The reliability lane's sanitizer run (README, "The reliability lane"): every compiled module rebuilt
# with ASan+UBSan into build/sanitizers, the kernel, bad-input, fuzz and thread tests run against it.
# Kept out of `make test` for its time (a few minutes); .ci/run runs both.
check-deep: setup
	$(VPY) tests/sanitizers/run.py

# The CUDA lane, on a machine with a GPU (see .ci/cuda_lane): the CUDA tests, compute-sanitizer and
# the GPU benchmark, with that machine's own python3 and torch and a JIT build; in two phases,
# `bash .ci/cuda_lane test` and `bash .ci/cuda_lane check`, one command each.
cuda-lane:
	bash .ci/cuda_lane

# The same phase scripts and test selection here, without a GPU: the GPU tests on the emulated
# kernels (logs and summary in build/cuda-lane-dry/).
cuda-lane-dry: setup
	FUSED_WLOSS_LANE=emu PYTHON=$(VPY) bash .ci/cuda_lane

# make bench BENCH_ARGS="--full" (or "--device cuda", "--filter dynamic"): see python -m benchmarks --help
BENCH_ARGS ?= --quick
bench: setup
	$(VPY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fused_wloss/*.so
