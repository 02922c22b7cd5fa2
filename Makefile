# The two commands of the README: `make demo` and `make test`. Each creates .venv first (`make venv`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test,nudity]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/erase demo --out out/demo

# Exit code 5 is pytest's "no tests were collected": for this project that means the suite is broken, so it
# fails with a message instead of passing silently.
test: venv
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5); the suite is misconfigured" >&2; fi; \
	exit $$rc

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) out build *.egg-info
