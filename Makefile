# make test: create .venv (CPU torch first), install the project with its test extras, run the suite.
# make demo: the same set-up, then the whole chain offline on local Ray (interposer demo).
# make rehearsal: the README's cluster recipe on one machine (bench/cluster.py).

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0

.PHONY: test test-fast demo venv bench rehearsal clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first: otherwise the project's torch range pulls a multi-GB CUDA build
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=25 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-fast: venv  # the edit loop: every test but the slow end-to-end runs (make test runs all, as CI)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/interposer demo --out demo-output

bench: venv
	$(PY) bench/run.py

rehearsal: venv  # the cluster recipe on one machine: S3 server, three Ray nodes, nodes lost (bench/cluster.py)
	HF_HUB_OFFLINE=1 $(PY) bench/cluster.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
