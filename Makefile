# Two commands for a fresh clone: `make train` and `make test`, on the versions in requirements.lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# The locked torch; a CPU wheel of it when there is no GPU (the default wheel is a multi-GB CUDA build).
CPU_TORCH ?= $(shell grep '^torch==' $(LOCK))

.PHONY: train test lock gpu-check clean

# The lock is a constraints file: pyproject.toml keeps ranges for installs into other environments.
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(PY) -m pip install --quiet --constraint $(LOCK) -e ".[test,data]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m launch $(ARGS)

# --dist loadfile: a test module's tests share one worker, so a module's process group is spawned once.
test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

# Moves the lock to the newest releases after the suite passes on them; prints what moved.
lock:
	bash .ci/refresh-lock

# The GPU path (attention kernel, grouped GEMM, AC memory per mode, bf16 steps, EP dispatchers on
# 2+ GPUs); prints one line and exits 0 without CUDA.
gpu-check: $(VENV)/.installed
	$(PY) -m tests.bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs
