# Every target creates .venv if it is missing and installs the pinned dependencies into it.
# TORCH_SPEC pins the CPU build used on development and CI machines; override it on a GPU machine,
# e.g. `make test TORCH_SPEC=torch`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT ?= demo-out

.PHONY: demo test docs bench lint format clean

# The last install step: torchvision for its model classes (tests/test_transformers.py), at the release matching the
# installed torch (torch 2.N pairs with torchvision 0.(N+15)), without its dependencies so that it never swaps torch
# for another build. Beside a CPU torch its C ops cannot load: packnet.compat.import_torchvision makes it importable.
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench,demo,dev,docs]"
	$(PY) -m pip install -q --no-deps "torchvision==$$($(PY) -c 'import torch; print("0.%d.*" % (int(torch.__version__.split(".")[1]) + 15))')"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/packnet demo --out $(OUT) --json $(OUT)/demo.json

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q benchmarks --benchmark-disable

# The site (docs/ and the API reference from the docstrings) into site/; any warning fails the build.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed
	$(VENV)/bin/packnet bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(OUT) packnet-bench site .pytest_cache .benchmarks
