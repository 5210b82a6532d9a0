# make demo   — install, generate the embedded data, train, evaluate, caption one image
# make test   — install (and Debian's chromium for the browser test), run the default test suite
# make flickr8k — the Flickr8k benchmark (../shared/data/flickr8k): cache, train, self-critical, select on val, test
# make rsicd    — the RSICD benchmark (../shared/data/rsicd), the same stages
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow lint bench flickr8k rsicd clean chromium

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

# the web page's browser test drives Debian's chromium (Playwright downloads no browser); where
# it cannot be installed the test skips, except under CI=true, where it fails
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium (apt-get install chromium): the browser test will skip"; }

test: $(STAMP) chromium
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
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_encoders.py

clean:
	rm -rf outputs multirun bench_results
