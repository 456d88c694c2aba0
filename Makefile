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

.PHONY: install test demo bench clean help

help:
	@echo "make demo   - set up, then run the main job end to end (writes artifacts/demo/)"
	@echo "make test   - set up, then run the CPU test suite"
	@echo "make bench  - featurizer, index and weight-learning benchmarks (JSON)"
	@echo "make clean  - remove the virtual environment and artifacts/"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first: the local CPU build; afterwards the project's torch range is already met.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(NETNS) $(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(NETNS) $(VENV)/bin/attribution demo --config configs/demo.yaml

bench: install
	$(NETNS) $(VENV)/bin/attribution bench featurize --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench index --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench weights --json
	$(NETNS) $(VENV)/bin/attribution --log-level WARNING bench serve --json

clean:
	rm -rf $(VENV) artifacts
