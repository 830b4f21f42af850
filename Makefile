# The two commands of the README. `make quickstart` installs everything into .venv and runs the main job on
# the embedded defaults; `make test` runs the test suite.
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/quickstart.yaml

.PHONY: install quickstart test

install:
	scripts/install.sh $(TARGET)

quickstart: install
	$(BIN)/eksft models prepare embedded:smollm2-135m-instruct
	$(BIN)/eksft data preview --recipe $(RECIPE) -n 2
	$(BIN)/eksft run $(RECIPE)

test:
	$(BIN)/python -m pytest -q --timeout 900 --durations=40 tests
