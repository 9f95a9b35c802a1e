# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= runs/demo

.PHONY: venv demo test bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test,faiss,export]'
	touch $@

demo: venv
	$(PY) tools/demo.py --output-dir $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/run_all.py

# On a GPU machine: under 8 minutes, with .venv when there is one (its torch is a CUDA build), else with
# $(PYTHON), the machine's interpreter that has torch. GPU_CHECK_ARGS, e.g. --dry-run, --wheels DIR,
# --archive FILE.tar.gz (bench/README.md).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	PYTHON="$(GPU_PYTHON)" bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs
