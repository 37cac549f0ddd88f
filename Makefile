# The few targets a newcomer needs. `make test` and `make demo` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: install test demo lint bench clean reproduce

install: $(STAMP)

# (Re)creates the venv when it is missing or broken, reinstalls when setup.py changed.
$(STAMP): setup.py
	@$(PY) -c "import sys" 2>/dev/null || { rm -rf $(VENV); python3 -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 tests

demo: install
	$(PY) tools/demo.py

# Issue 11: the papers' context-extension findings at tiny scale (~15 min on 2 CPU cores).
reproduce: install
	$(PY) examples/reproduce_longctx.py

lint: install
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check megatron_longctx tools tests benchmarks

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out .pytest_cache
