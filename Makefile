# Front door: `make demo` runs the main job, `make test` the whole suite. Both set everything up
# on a fresh machine: a venv that reuses an installed torch (else torch==2.13.0), then an
# incremental build of the extension against it (no build isolation: torch is not a build dep).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
NVCC   ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup build demo test cuda-check cuda-bindings-check bench clean

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" ninja numpy pytest hypothesis scikit-learn
	cmake --version 2>/dev/null | awk 'NR==1 {split($$3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 25))}' \
		|| $(PY) -m pip install -q "cmake>=3.25"
	touch $@

setup: $(VENV)/.ready

build: setup
	$(PY) -m pip install -q --no-build-isolation -e .

demo: build
	$(VENV)/bin/difforge demo

# The CUDA kernels are torch-free: nvcc compiles them for sm_90a even where torch is CPU-only.
cuda-check:
	@if [ -n "$(NVCC)" ]; then \
		cmake -S cuda -B build/cuda-check -G Ninja -DCMAKE_CUDA_COMPILER=$(NVCC) -DCMAKE_BUILD_TYPE=Release >/dev/null \
		&& cmake --build build/cuda-check -j 2 && echo "cuda-check: every .cu file compiles for sm_90a" \
		&& $(MAKE) --no-print-directory cuda-bindings-check; \
	else echo "cuda-check: nvcc not found, skipped"; fi

# The CUDA registrations (bindings/*_cuda.cpp) need torch's c10/cuda headers, which a CPU torch lacks: syntax-check
# them against stand-ins (cmake/cuda_binding_shim) so a binding that cannot compile fails here, not on a GPU box.
CUDA_INCLUDE ?= $(dir $(firstword $(wildcard $(dir $(realpath $(NVCC)))../include/cuda_runtime.h \
	$(CUDA_HOME)/include/cuda_runtime.h /usr/local/cuda/include/cuda_runtime.h)))
TORCH_INCLUDE = $(shell $(PY) -c "import torch, os; print(os.path.dirname(torch.__file__) + '/include')")
cuda-bindings-check: setup
	@for f in bindings/*_cuda.cpp; do \
		$(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Icmake/cuda_binding_shim \
			-I$(TORCH_INCLUDE) -I$(TORCH_INCLUDE)/torch/csrc/api/include -I$(CUDA_INCLUDE) \
			-Icpp/include -Icpp -Ibindings -Icuda/include $$f || exit 1; \
	done && echo "cuda-bindings-check: every bindings/*_cuda.cpp compiles"

test: build cuda-check
	$(PY) -m pytest $(PYTEST_ARGS)

bench: build
	$(VENV)/bin/difforge-bench

clean:
	rm -rf build $(VENV)
