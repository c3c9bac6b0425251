# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   -> creates .venv if missing, installs negspace, runs the main job
#   make test   -> creates .venv if missing, installs negspace[dev], runs ruff + pytest
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Torch wheels: pinned to the releases this project is tested with. Override on your machine,
# e.g. `make test TORCH_SPEC="torch torchvision"` to take whatever pip resolves.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_ARGS ?= --quick

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/negspace demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

test: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: venv
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info
