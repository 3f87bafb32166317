# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a CUDA machine install the matching torch first (see README).
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(PY) cli.py fit --config configs/p2_contrastive.yaml --config configs/profiles/p2_contrastive_cpu.yaml \
		--trainer.default_root_dir $(DEMO_DIR)
	cat $(DEMO_DIR)/gate_report.json
	ls $(DEMO_DIR)/plots/*_latest.png

# Two pytest-xdist workers of one thread each: most of the suite waits on subprocesses starting up.
test: setup
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs
