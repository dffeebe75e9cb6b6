# One entry point: `make demo` runs the main job, `make test` runs lint and the test suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this kind of machine's disk; an unpinned torch pulls CUDA.
TORCH ?= torch==2.13.0
DEMO_DATA ?= data/demo

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/cbir synth --out $(DEMO_DATA) --patients 16 --seed 0 --workers 2 \
		--preview $(DEMO_DATA)/preview.png
	@echo "A synthetic cohort is in $(DEMO_DATA) (look at $(DEMO_DATA)/preview.png)."
	@echo "Still missing before the demo can serve searches: the model and its checkpoint"
	@echo "(issue 3), the index (issue 4) and the service (issue 5)."

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
