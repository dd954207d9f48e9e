PYTHON ?= python3

.PHONY: install test lint world

# One set-up command: everything into the active Python 3.11 environment (use a virtualenv).
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -r requirements-nodeps.txt
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .

# Tests run in parallel, one worker per core (at most 4), handed out one or two at a time.
test:
	$(PYTHON) -m pytest -n auto --maxprocesses=4 --maxschedchunk=2

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The embedded synthetic nuScenes world at its default size.
world:
	$(PYTHON) -m uniscene_jax.data.synthetic_world --out data/synthetic --overwrite
