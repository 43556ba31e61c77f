# ridgeline: every target installs into .venv first (torch pinned to the local CPU wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e ".[dev,hf,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ridgeline study

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m pip install -q "$(TORCH_PIN)" -e ".[bench]" || echo "some peer libraries did not install; their rows are skipped"
	# curvlinops and nngeometry declare dependencies that would replace torch: install them without
	$(BIN)/python -m pip install -q --no-deps nngeometry==0.4 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0 linear_operator==0.6.1 || echo "curvlinops unavailable; its rows are skipped"
	$(BIN)/python -m benchmarks all

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
