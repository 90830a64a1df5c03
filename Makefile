# Two commands for a fresh clone: `make demo` runs the main job, `make test` the tests.
# Each sets up its own virtual environment first (see tools/bootstrap.py).
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: demo test test-long bench check clean

$(READY): pyproject.toml tools/bootstrap.py
	python3 tools/bootstrap.py $(VENV)
	touch $(READY)

demo: $(READY)
	$(PY) -m fusedopt.demo

test: $(READY)
	$(PY) -m pytest -q

# The property tests with many more examples than CI draws.
test-long: $(READY)
	FUSEDOPT_HYPOTHESIS_EXAMPLES=500 $(PY) -m pytest -q tests/test_property.py

bench: $(READY)
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=median,iqr,rounds --benchmark-group-by=param:case

check: $(READY)
	$(PY) -m fusedopt.kernels --check

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
