# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# The first target that needs it creates .venv and installs flipscope into it, and, run as root
# on Debian/Ubuntu, Chromium for the PNG figures (without it the figures are HTML only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flipscope-installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all test-portable lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,gemma270m]'
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
	  echo "Chromium not installed (needs root and apt-get): figures will be HTML only, PNGs skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flipscope demo

# Two workers of one thread each (unless OMP_NUM_THREADS says otherwise); a module stays on one
# worker, so its fixtures are built once. An organism build runs its fixed two threads inside a
# worker, so cores can be oversubscribed: OpenMP threads then wait asleep instead of spinning
# (which made such a build 3× slower while the other worker built too; the bits are the same).
# The costliest modules go first (tests/conftest.py), so neither worker ends on one alone.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
THREADS = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}
test: $(STAMP)
	$(THREADS) $(PY) -m pytest -q $(XDIST) --durations=15

test-all: $(STAMP)
	$(THREADS) $(PY) -m pytest -q $(XDIST) -m '' --durations=15

# The numerically sensitive tests under four float summation orders (tests/README.md).
PORTABLE := tests/test_demo.py tests/test_gguf.py tests/test_organism_default.py tests/test_organism_build.py \
	tests/test_null_organism.py tests/test_patching.py tests/test_kernels.py tests/test_heads.py \
	tests/test_span_patching.py tests/test_dashboard.py
test-portable: $(STAMP)
	@for setting in OMP_NUM_THREADS=1 OMP_NUM_THREADS=2 OMP_NUM_THREADS=4 ATEN_CPU_CAPABILITY=default; do \
	  echo "== $$setting"; env $$setting $(PY) -m pytest -q $(PORTABLE) || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check flipscope tests benchmarks analyses
	$(VENV)/bin/ruff format --check flipscope tests benchmarks analyses

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
