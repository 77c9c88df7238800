# One entry point for people and CI. Everything a target needs is installed by the
# target itself: a fresh machine only needs python3, go and make.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help venv binaries test-binaries tools test test-unit test-cluster test-trainer lint manifests check-manifests \
        cluster-up cluster-down run install uninstall deploy undeploy demo bench bench-scale chaos clean \
        images docker-build docker-push node-tools

help:
	@echo "make demo          - build/start a local control plane, run the operator and example jobs"
	@echo "make test          - install everything and run the whole test suite"
	@echo "make cluster-up    - start the local control plane in the background (prints KUBECONFIG);"
	@echo "                     REAL_NODE=1 adds the real node (kubelet + containerd)"
	@echo "                     KUEUE=1 adds Kueue (plain-pod integration; README, Queueing with Kueue)"
	@echo "make images        - build the operator and trainer images with podman"
	@echo "make cluster-down  - stop it"
	@echo "make test-unit     - the fast tests only (no control plane, no trainer); also"
	@echo "                     test-cluster (local control plane) and test-trainer (real trainer, CPU)"
	@echo "make lint          - ruff and mypy (configured in pyproject.toml); make test runs it"
	@echo "make manifests     - regenerate crds/ from the pydantic models, deploy/crd/ and the Helm chart"
	@echo "                     (charts/, from deploy/); check-manifests: fail if stale"
	@echo "make run           - run the operator against the current kubeconfig"
	@echo "make install       - apply the CRD to the current kubeconfig; uninstall deletes it"
	@echo "make deploy        - apply deploy/ (CRD, namespace, RBAC, operator) to the current kubeconfig;"
	@echo "                     undeploy deletes it"
	@echo "make bench / chaos - benchmark and chaos runs; bench-scale: the cost curve to 10,000 jobs"

# One repository, four distributions (pyproject.toml lists them); one pip run resolves the
# local ones by name.
PACKAGES := trainer-image/contract operator trainer-image hack
PYPROJECTS := pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGES))
$(STAMP): $(PYPROJECTS)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(addprefix -e ,$(PACKAGES)) -e .
	touch $@

venv: $(STAMP)

binaries:
	bash hack/build-binaries.sh

# ... and MinIO, which only the trainer's push tests need (tests/trainer/test_push_s3.py).
test-binaries: binaries
	bash hack/build-binaries.sh minio

manifests: $(STAMP)
	$(VPY) -m finetune_operator.api.crd --write crds/
	bash hack/sync-crd.sh
	$(VPY) hack/gen-prometheusrule.py
	$(VPY) hack/gen-chart.py

check-manifests: $(STAMP)
	$(VPY) -m finetune_operator.api.crd --check crds/
	diff -r -x kustomization.yaml crds/ deploy/crd/
	$(VPY) hack/gen-chart.py --check

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

tools:
	bash hack/install-tools.sh

node-tools:
	bash hack/install-tools.sh node

# The Go builds (CPU-bound) and the image builds (downloads, unpacking, layer writes) overlap.
test: $(STAMP) tools lint check-manifests
	$(MAKE) --no-print-directory -j2 test-binaries images
	$(VPY) -m pytest tests $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(VPY) -m pytest tests -m "not cluster and not trainer and not e2e" $(PYTEST_ARGS)

test-cluster: $(STAMP) tools binaries
	$(VPY) -m pytest tests -m "cluster and not e2e" $(PYTEST_ARGS)

test-trainer: $(STAMP)
	$(VPY) -m pytest tests -m "trainer and not e2e" $(PYTEST_ARGS)

# REAL_NODE=1: also the real node (kubelet + containerd running the images built here).
# KUEUE=1: also Kueue's manager, for namespaces labelled finetune.dev/kueue=enabled.
REAL_NODE ?= 0
KUEUE ?= 0
cluster-up: $(STAMP) binaries $(if $(filter 1,$(REAL_NODE)),node-tools images)
	REAL_NODE=$(REAL_NODE) KUEUE=$(KUEUE) $(VPY) -m finetune_testbed up

cluster-down: $(STAMP)
	$(VPY) -m finetune_testbed down

install: $(STAMP)
	kubectl apply --server-side -f crds/

uninstall: $(STAMP)
	kubectl delete --ignore-not-found -f crds/

# The manifests as deploy/README.md describes them (set the image first: kustomize edit set image).
deploy: $(STAMP)
	kubectl apply --server-side -k deploy/

undeploy: $(STAMP)
	kubectl delete --ignore-not-found -k deploy/

run: $(STAMP)
	$(VPY) -m finetune_operator

demo: $(STAMP) binaries node-tools images
	$(VPY) -m finetune_testbed.demo

# The operator as the image installs it (no extras): what RSS and CPU figures should describe.
OPVENV := .venv-operator
$(OPVENV)/.installed: trainer-image/contract/pyproject.toml operator/pyproject.toml
	test -x $(OPVENV)/bin/python || $(PY) -m venv $(OPVENV)
	$(OPVENV)/bin/python -m pip install -q -e trainer-image/contract -e operator
	touch $@

# kubernetes_asyncio only for the client comparison, outside the venv: kopf imports it
# whenever it is installed, and the operator would pay for it.
CLIENT_SITE := .state/client-compare-site
$(CLIENT_SITE)/.installed:
	$(VPY) -m pip install -q --no-deps --target $(CLIENT_SITE) kubernetes_asyncio==36.1.0
	touch $@

# BENCH_RUNS=3: three runs in a row (sides alternate: ours, Job, ours, Job, ...), then their
# median and (min-max) per row (bench/summary.py); JSON of each run in .state/bench-<time>/.
BENCH_RUNS ?= 1
bench: $(STAMP) $(OPVENV)/.installed binaries $(CLIENT_SITE)/.installed
	@dir=.state/bench-$$(date +%Y%m%d-%H%M%S); mkdir -p $$dir; \
	for i in $$(seq $(BENCH_RUNS)); do \
	  $(VPY) -m bench.run --operator-python $(OPVENV)/bin/python --json-out $$dir/run-$$i.json $(BENCH_ARGS) || exit 1; \
	done; \
	$(VPY) -m bench.summary $$dir/run-*.json
	$(VPY) -m bench.client_compare --site $(CLIENT_SITE)
	$(if $(BENCH_GANG),$(VPY) -m bench.gang_restart --operator-python $(OPVENV)/bin/python $(BENCH_GANG_ARGS))

# The cost curve: 1,000 / 3,000 / 10,000 TrainingJobs of which 1,000 Running (bench/README.md).
bench-scale: $(STAMP) $(OPVENV)/.installed binaries
	$(VPY) -m bench.scale --operator-python $(OPVENV)/bin/python $(SCALE_ARGS)

JOBS ?= 300
chaos: $(STAMP) binaries
	$(VPY) -m finetune_testbed.chaos --jobs $(JOBS)

# Container images, built with podman (no Docker daemon): `make images` builds both on a base
# made from Debian packages (hack/build-images.sh; BASE_IMAGE=upstream for the pinned ones).
# docker-build / docker-push: the operator image as $(IMG), as kubebuilder projects have them;
# with docker when its daemon answers (plain `docker build`: the pinned upstream base),
# with podman otherwise (hack/build-images.sh operator). CONTAINER_TOOL overrides the choice.
IMG ?= localhost/finetune-operator:dev
CONTAINER_TOOL ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)

images:
	bash hack/build-images.sh all

docker-build:
	@if [ '$(CONTAINER_TOOL)' = podman ]; then \
	  set -x; OPERATOR_IMG='$(IMG)' BASE_IMAGE='$(BASE_IMAGE)' bash hack/build-images.sh operator; \
	else \
	  set -x; $(CONTAINER_TOOL) build -t '$(IMG)' $(if $(BASE_IMAGE),--build-arg BASE_IMAGE='$(BASE_IMAGE)') .; \
	fi

docker-push:
	$(CONTAINER_TOOL) push '$(IMG)'

clean:
	rm -rf $(VENV) $(OPVENV) .pytest_cache .hypothesis
