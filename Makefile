# Every target creates or reuses .venv and installs what it needs: one command each on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pcbkit-installed

.PHONY: install test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the dependency files change. torch/torchvision come from the pins in constraints.txt.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

# The main job: synth -> train softmax + PCB -> dump-logits -> stats -> calibrate -> reports/demo/.
# Cached: a rerun skips the steps whose inputs have not changed (`pcbkit demo --force` redoes them).
demo: $(STAMP)
	$(VENV)/bin/pcbkit demo

bench: $(STAMP)
	$(PY) bench/eval_speed.py
	$(PY) bench/stats_speed.py
	$(PY) bench/train_overhead.py
	$(PY) bench/calibrate_overhead.py
	$(PY) bench/study_steps.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
