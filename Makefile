# make demo   — install, generate the embedded data, train, evaluate, caption one image
# make test   — install, run the default (fast) test suite
# make rsicd  — the RSICD benchmark (../shared/data/rsicd): cache, train, self-critical, test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow lint bench rsicd clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

rsicd: $(STAMP)
	$(PY) scripts/rsicd.py $(ARGS)

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
	$(PY) benchmarks/bench_encoders.py

clean:
	rm -rf outputs multirun bench_results
