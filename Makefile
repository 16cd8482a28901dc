# segserve: `make run` serves, `make test` checks. Both build .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARCH := $(shell uname -m)
# x86_64: this pair installs from local files on the project's machines; aarch64: the CPU build.
ifeq ($(ARCH),aarch64)
TORCH := torch==2.9.1 torchvision==0.24.1
else
TORCH := torch==2.14.1 torchvision==0.29.1
endif
PROTO := protos/segserve/v1/segserve.proto protos/inference/grpc_predict_v2.proto
TARGET ?= localhost:50051

.PHONY: install run server test test-cluster lint format protos bench bench-smoke bench-video clean debug

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## the server on :50051 and the Gradio page on http://localhost:7860; Ctrl-C stops both
	$(BIN)/python -m gradio_ui.launch

server: $(STAMP)  ## the server alone
	$(BIN)/python -m server

# The server under debugpy, on this machine's loopback only (debugpy runs any code sent to its port).
# DEBUGPY_WAIT=1: start serving only once a debugger has attached. Saving a .py file restarts the server
# (RELOAD=0 turns that off); the debugger follows. docs/debugging.md has the walk-through.
DEBUGPY_PORT ?= 5678
RELOAD ?= 1
debug: $(STAMP)  ## the server under debugpy on 127.0.0.1:$(DEBUGPY_PORT), restarted on every save
	SEGSERVE_RELOAD=$(RELOAD) $(BIN)/python -Xfrozen_modules=off -m debugpy --listen 127.0.0.1:$(DEBUGPY_PORT) \
		$(if $(DEBUGPY_WAIT),--wait-for-client) -m server

# The known-answer test model trains once (a few minutes on 2 cores) and is cached; doing it here keeps it
# out of any one test's timeout.
test: $(STAMP) lint
	$(BIN)/python -m tests.helpers.known_model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The cluster scenarios (tests/cluster/, docs/scaling.md): against the cluster in $KUBECONFIG when set, otherwise
# a local Kubernetes 1.20 in network namespaces (root), built once from Debian's packages by deploy/cluster/build.sh.
test-cluster: $(STAMP)
	SEGSERVE_CLUSTER_TESTS=1 $(BIN)/python -m pytest tests/cluster -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTO)

bench: $(STAMP)  ## load sweep against a real server, in-process limit, batching off: JSON, plot, docs/performance.md
	$(BIN)/python -m bench.run

bench-smoke: $(STAMP)  ## the same machinery in well under a minute; numbers meaningless
	$(BIN)/python -m bench.run --smoke

bench-video: $(STAMP)  ## video: clip frames/s at max sizes 512 and 256, live-tab latency; docs/performance.md
	$(BIN)/python -m bench.video --doc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
