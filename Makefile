# cxrlearn: the two commands of the README, and the pieces they stand on.
#   make demo   runs the main job on the real NIH data beside the checkout
#   make test   runs the test suite
# Both create .venv and install cxrlearn into it on first use.

PYTHON ?= python3.11
VENV   ?= .venv
DATA   ?= ../shared/data
OUT    ?= out/demo
BIN    := $(VENV)/bin
# Exact versions (pip-compile of pyproject.toml, Python 3.11 on Linux x86-64, the platform CI runs on).
# Elsewhere the lock's Linux-only wheels (CUDA libraries) do not exist: install from pyproject's ranges.
LOCK   ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),requirements.lock,)
TABLE  := $(DATA)/nih/Data_Entry_2017_v2020.csv.gz

.PHONY: install lock demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(LOCK),)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
else
	@echo "no lock for $$(uname -s) $$(uname -m): installing from pyproject.toml's version ranges"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
endif
	touch $@

# Refresh requirements.lock after changing pyproject.toml's dependencies (pip-tools, in a throw-away venv).
lock:
	$(PYTHON) -m venv $(VENV)-pip-tools
	$(VENV)-pip-tools/bin/python -m pip install --quiet pip-tools
	$(VENV)-pip-tools/bin/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --no-emit-trusted-host --output-file requirements.lock pyproject.toml

# The main job: the fair split of the full table (and of the official test list), then a
# model trained on the real sample (split -> cache -> train -> bundle), then its evaluation report
# (patient-level CIs, operating points, calibration). Its time, measured: README.md, Quickstart.
demo: install
	$(BIN)/cxrlearn split --csv $(TABLE) --out $(OUT)/split.csv
	$(BIN)/cxrlearn split --csv $(TABLE) --official-test $(DATA)/nih/test_list.txt --out $(OUT)/split-official-test.csv
	$(BIN)/cxrlearn stats --csv $(TABLE) --split $(OUT)/split.csv --json $(OUT)/stats.json > $(OUT)/stats.txt
	rm -rf $(OUT)/cpu-sample $(OUT)/evaluation
	$(BIN)/cxrlearn train --config configs/cpu-sample.yaml --csv $(TABLE) \
		--images $(DATA)/nih-sample/images-256 --out $(OUT)/cpu-sample
	$(BIN)/cxrlearn evaluate --model $(OUT)/cpu-sample --csv $(TABLE) --images $(DATA)/nih-sample/images-256 \
		--subset test --expert-labels $(DATA)/nih/google2019_nih-chest-xray-labels.csv.gz --tta --calibrate --out $(OUT)/evaluation
	@echo
	@echo "Results in $(OUT)/:"
	@echo "  split.csv, split-official-test.csv (+ .report.json)   the fair patient-wise splits of the full table"
	@echo "  stats.txt, stats.json                                  findings, co-occurrence, views, age, sex per split"
	@echo "  cpu-sample/model.json + model.safetensors              the trained model bundle"
	@echo "  cpu-sample/metrics.json                                per-finding AUC on the sample's val and test splits"
	@echo "  cpu-sample/logs/                                       metrics.csv and TensorBoard logs"
	@echo "  evaluation/report.html (and report.md)                 the evaluation report: open it in a browser"
	@echo "  evaluation/metrics.json, predictions.csv               every figure of the report, and the predictions"
	@echo "  cpu-sample/MODEL_CARD.md                               the model card (also: cxrlearn card $(OUT)/cpu-sample)"

test: install
	CXRLEARN_DATA=$(DATA) $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
