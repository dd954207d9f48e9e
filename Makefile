PYTHON ?= python3

.PHONY: install test lint world

# One set-up command: everything into the active Python 3.11 environment (use a virtualenv).
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -r requirements-nodeps.txt
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The embedded synthetic nuScenes world at its default size.
world:
	$(PYTHON) -m uniscene_jax.data.synthetic_world --out data/synthetic --overwrite
