# Two commands on a fresh machine (Python 3.11, no GPU needed):
#   make demo   set up .venv and run the main job: tiny GPT pretraining on CPU through the deepspeed launcher,
#               baseline vs random-LTD, printing the savings table (outputs/tiny_gpt/)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --ignore-requires-python megatron-core==0.19.2
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

lint: setup
	$(BIN)/ruff check .
	bash .ci/check_cuda.sh $(BIN)/python

test: lint
	$(BIN)/python -m random_ltd info
	$(BIN)/python -m pytest -q -ra tests

demo: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python launch/compare.py --nproc 2 --out outputs/tiny_gpt

clean:
	rm -rf $(VENV) build *.egg-info random_ltd/*.so
