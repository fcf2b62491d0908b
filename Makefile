# Each target installs the project into .venv when it is missing or pyproject.toml
# changed, so `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo lint bench bench-scale bench-quality bench-negatives bench-iceberg bench-decode-memory bench-skip clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The 15 slowest tests are printed at the end of every run, so where the time goes stays in sight.
test: $(STAMP)
	$(PY) -m pytest --durations=15

# For iteration: the tests that start neither Ray nor a server (tests/conftest.py marks those `slow`).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" --durations=15

demo: $(STAMP)
	$(VENV)/bin/clipn demo

lint: $(STAMP)
	$(VENV)/bin/ruff check clipn_core jobs schemas tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_throughput.py

bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py

bench-quality: $(STAMP)
	$(PY) benchmarks/bench_quality.py --out bench_quality_out

bench-negatives: $(STAMP)
	$(PY) benchmarks/bench_negatives.py

bench-skip: $(STAMP)
	$(PY) benchmarks/bench_skip.py

bench-decode-memory: $(STAMP)
	$(PY) benchmarks/bench_decode_memory.py

bench-iceberg: $(STAMP)
	$(PY) -m pip install --quiet pyiceberg-core  # Ray's write_iceberg (the upsert compared) needs it
	$(PY) benchmarks/bench_iceberg.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out bench_quality_out
