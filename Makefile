# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NETNS  := scripts/loopback-only

# Keep everything the tests and the demo start on this machine (see scripts/loopback-only).
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export AWS_EC2_METADATA_DISABLED := true
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install browser test test-fast demo bench clean help image-cpu image-gpu

help:
	@echo "make demo   - set up, then run the main job end to end (writes artifacts/demo/)"
	@echo "make test   - set up, then run the CPU test suite"
	@echo "make test-fast - the tests that need no Ray (the core, deploy files): the edit-run loop"
	@echo "make bench  - featurizer, index and weight-learning benchmarks (JSON)"
	@echo "make clean  - remove the virtual environment and artifacts/"
	@echo "make image-cpu / image-gpu - the container image for a Ray cluster (deploy/Dockerfile; needs docker)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: the local CPU build; afterwards the project's torch range is already met.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium renders the evaluation report in a test: Debian's package, as root.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's chromium (the report test renders the evaluation report headless)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
	  echo "warning: no chromium, and no root apt-get to install it: the report rendering test will be skipped"; \
	fi

test: install browser
	$(NETNS) $(PY) -m pytest $(PYTEST_ARGS)

# The edit-run loop: every test not marked slow (slow: starts Ray, Serve or a training job; see tests/conftest.py).
test-fast: install
	$(NETNS) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	$(NETNS) $(VENV)/bin/attribution demo --config configs/demo.yaml

bench: install
	$(NETNS) $(VENV)/bin/attribution bench featurize --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench index --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench weights --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench serve --json

# Container images for a Ray cluster (deploy/README.md): the official Ray image of the pinned
# Ray version with the project installed. The KubeRay manifests in deploy/kuberay name these tags.
IMAGE     ?= attribution-ray
IMAGE_TAG ?= 0.1.0
RAY_IMAGE ?= rayproject/ray:2.60.0-py311

image-cpu:
	docker build -f deploy/Dockerfile --build-arg RAY_IMAGE=$(RAY_IMAGE)-cpu \
	  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t $(IMAGE):$(IMAGE_TAG)-cpu .

image-gpu:
	docker build -f deploy/Dockerfile --build-arg RAY_IMAGE=$(RAY_IMAGE)-gpu \
	  --build-arg TORCH_INDEX=https://pypi.org/simple -t $(IMAGE):$(IMAGE_TAG)-gpu .

clean:
	rm -rf $(VENV) artifacts
