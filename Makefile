# Two commands for a fresh clone: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU wheel of torch when there is no GPU: the default wheel is a multi-GB CUDA build.
CPU_TORCH ?= torch==2.13.0

.PHONY: train test gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m launch $(ARGS)

# --dist loadfile: a test module's tests share one worker, so a module's process group is spawned once.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

# The GPU path (attention kernel, grouped GEMM, AC memory per mode, bf16 steps, EP dispatchers on
# 2+ GPUs); prints one line and exits 0 without CUDA.
gpu-check: $(VENV)/.installed
	$(PY) -m tests.bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs
