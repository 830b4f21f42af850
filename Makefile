# The README's commands. `make install` puts everything into .venv; `make quickstart` (installing first) runs the
# main job on the embedded defaults; `make test` runs the test suite. CI (.ci/run) is `make install` + `make test`.
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/quickstart.yaml

.PHONY: install quickstart test

install:
	scripts/install.sh $(TARGET)

# `make test` on a fresh clone installs first; once .venv has the eksft command it does not reinstall.
$(BIN)/eksft:
	scripts/install.sh $(TARGET)

quickstart: install
	$(BIN)/eksft models prepare embedded:smollm2-135m-instruct
	$(BIN)/eksft data preview --recipe $(RECIPE) -n 2
	$(BIN)/eksft run $(RECIPE)

# Two pytest-xdist processes: much of a test's time is one-threaded (importing vLLM, starting engines and Ray
# workers), which the other process fills (33.9 -> 26.1 min on 2 AVX2 cores). The tests that load the embedded model
# or run whole pipelines share one process (conftest.py), so that two of them never hold host memory at once.
# PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
test: | $(BIN)/eksft
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --timeout 900 --durations=40 tests
