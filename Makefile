# Two commands for a fresh clone: `make demo` runs the main job, `make test` the tests.
# Each sets up its own virtual environment first (see tools/bootstrap.py).
VENV ?= .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: demo test test-integrations test-long bench check clean

$(READY): pyproject.toml tools/bootstrap.py
	python3 tools/bootstrap.py $(VENV)
	touch $(READY)

demo: $(READY)
	$(PY) -m fusedopt.demo

test: $(READY)
	$(PY) -m pytest -q

# Lightning and Transformers' Trainer: installs the `integrations` extra into the venv.
INTEGRATIONS := $(VENV)/.integrations

$(INTEGRATIONS): $(READY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[integrations]"
	touch $(INTEGRATIONS)

test-integrations: $(INTEGRATIONS)
	$(PY) -m pytest -q tests/integrations

# The property tests with many more examples than CI draws.
test-long: $(READY)
	FUSEDOPT_HYPOTHESIS_EXAMPLES=500 FUSEDOPT_LIFECYCLE_EXAMPLES=3000 $(PY) -m pytest -q tests/test_property.py tests/test_lifecycle.py \
		tests/test_average_lifecycle.py

# The runner (every algorithm and AveragedModel against torch's for-loop, foreach and fused
# paths: a table, bench-results/results.json and results.png; a few minutes on 2 CPU
# cores), then the pytest-benchmark suites in benchmarks/. `python -m fusedopt.bench -h`.
bench: $(READY)
	$(PY) -m fusedopt.bench --out bench-results
	$(PY) -m pytest -q benchmarks --benchmark-enable --benchmark-columns=median,iqr,rounds \
		--benchmark-group-by=group --benchmark-max-time=0.5

check: $(READY)
	$(PY) -m fusedopt.kernels --check

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks bench-results
