# Set-up is part of every target: a fresh machine needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv browser clean

demo: $(STAMP)
	$(PY) -m satic demo $(ARGS)

test: $(STAMP) browser
	$(PY) -m pytest -n 2 -q $(ARGS)

venv: $(STAMP)

# Exactly torch==2.13.0 first; the package's own range then installs no other torch. TORCH_INDEX picks
# the build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for one without CUDA libraries.
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The HTML-report test opens the page in headless Chromium; install it where we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: chromium not installed; the browser test will be skipped"; }

clean:
	rm -rf $(VENV) runs
