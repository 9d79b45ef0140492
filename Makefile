# Every target creates or reuses .venv and installs what it needs: one command each on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pcbkit-installed
DATA   ?= data/synth

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

# Until the training pipeline lands, the demo generates the embedded synthetic dataset and evaluates
# a clearly labelled REFERENCE detection file (jittered ground truth, not a detector) on it.
demo: $(STAMP)
	$(VENV)/bin/pcbkit synth --out $(DATA)
	$(PY) scripts/reference_detections.py --gt $(DATA)/val.json --out $(DATA)/reference_detections_val.json
	$(VENV)/bin/pcbkit evaluate --gt $(DATA)/val.json --results $(DATA)/reference_detections_val.json --iou-type both --fixed-ap --out $(DATA)/reference_metrics_val.json
	@echo "demo outputs: $(DATA)/ (train.json, val.json, images/, reference_detections_val.json, reference_metrics_val.json)"

bench: $(STAMP)
	$(PY) bench/eval_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
