# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

# The stamp depends on requirements.txt: a second run skips the install entirely.
$(STAMP): requirements.txt pyproject.toml scripts/setup_system.sh
	bash scripts/setup_system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	cd / && $(abspath $(PY)) -c "import torch, torchvision, ffcv, nvidia.dali, numpy, yaml, obstore, moto, core, loaders, engine, storage"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config configs/sample_cpu.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data/sample *.egg-info
