# uda_tf: `make demo` runs the whole job on built-in data, `make test` runs the tests.
# Any Python >= 3.11 (TensorFlow 2.21 wheels: 3.11-3.13): the first of these on PATH, or
# make PYTHON=/path/to/python.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,$(shell command -v $(p) 2>/dev/null)))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test install clean-demo

install: $(STAMP)

# Re-install when the packaging changes; `pip install -e` keeps code edits live. pip would
# byte-compile the packages on one core; compileall does it on all of them. (They must be
# compiled here: where PYTHONDONTWRITEBYTECODE is set, every process would compile its imports.)
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "no python3 on PATH: make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(PYTHON) is Python $$($(PYTHON) -V 2>&1); uda_tf needs >= 3.11: make PYTHON=..." >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null
	touch $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m uda_tf.cli.demo --output_root=$(DEMO_OUT)

# Parallel test processes (pytest-xdist); TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= auto
test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -n $(TEST_WORKERS)

clean-demo:
	rm -rf $(DEMO_OUT)
