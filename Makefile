# The front door. `make test` is what CI runs (README.md); `make demo` is the main job.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
KUBECONFIG_LOCAL := /var/lib/tpconf-cluster/admin.kubeconfig

.PHONY: deps install lint test test-unit test-e2e schema bench bench-quick cluster cluster-down agent-image demo clean

install: deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

lint: install
	$(BIN)/ruff check tpconf tests bench
	$(BIN)/ruff format --check tpconf tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/tpconf schema --check

# What the e2e tests and the benchmarks run against: with KUBECONFIG unset (or the local one's),
# the local cluster, started (and the agent image loaded into it) before them, in this order;
# another KUBECONFIG is used as it is. pytest itself never starts a cluster: its `cluster` fixture
# fails with what to run when none answers.
CLUSTER_PREREQS := $(if $(filter-out $(KUBECONFIG_LOCAL),$(KUBECONFIG)),,cluster agent-image)
WITH_KUBECONFIG := KUBECONFIG=$${KUBECONFIG:-$(KUBECONFIG_LOCAL)}

# Unit and integration tests need no cluster (`make test-unit`); e2e tests need the one above.
# The benchmarks only have to run to completion here (`--quick`); numbers come from `make bench`.
test: lint $(CLUSTER_PREREQS)
	$(WITH_KUBECONFIG) $(BIN)/pytest
	$(WITH_KUBECONFIG) $(BIN)/python -m bench --quick

test-unit: install
	$(BIN)/pytest -m 'not e2e'

test-e2e: install $(CLUSTER_PREREQS)
	$(WITH_KUBECONFIG) $(BIN)/pytest -m e2e

schema: install
	$(BIN)/tpconf schema

bench: install $(CLUSTER_PREREQS)
	$(WITH_KUBECONFIG) $(BIN)/python -m bench

bench-quick: install $(CLUSTER_PREREQS)
	$(WITH_KUBECONFIG) $(BIN)/python -m bench --quick

# Installs only what is missing (no root needed when nothing is), so every entry point runs it.
deps:
	scripts/install-deps.sh

# Builds (once; Go caches are reused), then starts the cluster; up.sh loads the test images.
cluster: deps
	tests/cluster/build.sh all
	tests/cluster/up.sh

cluster-down:
	tests/cluster/down.sh

agent-image:
	tests/cluster/load-image.sh tpconf/agent tpconf/agent:0.1.0

# The local cluster, its helloworld Service, then `tpconf up` on ./telepresence.yaml (Ctrl-C ends it;
# the cluster keeps running: `make cluster-down`). The cluster's own kubectl goes first on PATH.
demo: install cluster agent-image
	KUBECONFIG=$${KUBECONFIG:-$(KUBECONFIG_LOCAL)} tests/cluster/demo-setup.sh
	PATH=/var/lib/tpconf-cluster/bin:$$PATH KUBECONFIG=$${KUBECONFIG:-$(KUBECONFIG_LOCAL)} \
		$(BIN)/tpconf up

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
