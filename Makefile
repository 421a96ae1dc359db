# Two commands set everything up on a fresh machine:
#   make demo   create .venv if missing, train the speech and vision defaults, write the report
#   make test   create .venv if missing, run ruff and the whole test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo

.PHONY: demo test venv lint bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) speech/train_gru.py --out $(DEMO)/speech
	$(PY) vision/train.py --out $(DEMO)/vision
	$(PY) -m strlowrank.report $(DEMO)/speech $(DEMO)/vision --out $(DEMO)/report

bench: $(STAMP)
	$(PY) -m bench.run_all

clean-venv:
	rm -rf $(VENV)
