# cxrlearn: the two commands of the README, and the pieces they stand on.
#   make demo   runs the main job on the real NIH data beside the checkout
#   make test   runs the test suite
# Both create .venv and install cxrlearn into it on first use.

PYTHON ?= python3.11
VENV   ?= .venv
DATA   ?= ../shared/data
OUT    ?= out/demo
BIN    := $(VENV)/bin
TABLE  := $(DATA)/nih/Data_Entry_2017_v2020.csv.gz

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/cxrlearn split --csv $(TABLE) --out $(OUT)/split.csv
	$(BIN)/cxrlearn split --csv $(TABLE) --official-test $(DATA)/nih/test_list.txt --out $(OUT)/split-official-test.csv
	$(BIN)/cxrlearn stats --csv $(TABLE) --split $(OUT)/split.csv --json $(OUT)/stats.json
	@echo "split files, their reports (*.report.json) and stats.json are in $(OUT)/"

test: install
	CXRLEARN_DATA=$(DATA) $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
