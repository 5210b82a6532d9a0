# make demo   — install, generate the embedded data, train, evaluate, caption one image
# make test   — install, run the default (fast) test suite
# make flickr8k — the Flickr8k benchmark (../shared/data/flickr8k): cache, train, self-critical, select on val, test
# make rsicd    — the RSICD benchmark (../shared/data/rsicd), the same stages
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow lint bench flickr8k rsicd clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

flickr8k: $(STAMP)
	$(PY) scripts/reproduce.py flickr8k $(ARGS)

rsicd: $(STAMP)
	$(PY) scripts/reproduce.py rsicd $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check captioner tests scripts benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench.py --transformer
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_features.py

clean:
	rm -rf outputs multirun bench_results
