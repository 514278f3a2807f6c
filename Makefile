# Set-up is part of every target: a fresh machine needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

demo: $(STAMP)
	$(PY) -m satic demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q $(ARGS)

venv: $(STAMP)

# torch==2.13.0 first (the CPU wheel); the package's own range then installs no other torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
