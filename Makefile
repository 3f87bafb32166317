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
	@# What the gate does not read: how much of the latent lies in its layout, and who-is-related-to-whom.
	$(PY) -c "import json; m = json.load(open('$(DEMO_DIR)/metrics.json'))['fit']; \
	print({k: round(m['val/' + k], 4) for k in ('spatial_text_dependence', 'template_share', 'cos_gap_swap_arguments')})"
	ls $(DEMO_DIR)/plots/*_latest.png

# Two pytest-xdist workers of one thread each: most of the suite waits on subprocesses starting up.
test: setup
	$(PY) -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs
